"""fxpress: compress neural networks the way a compiler would.

    import fxpress
    graph = fxpress.capture(model, example_inputs)
    result = fxpress.PassManager("fold-constants,dce").run(graph, fxpress.PassContext())
"""
from fxpress.errors import (ArtifactError, CalibrationError, CaptureError, FxpressError, LoweringError,
                            NumericError, PassError, PipelineError, PreconditionError, VerificationError,
                            ZooError)
from fxpress import ops  # noqa: F401  (the dialect: defines every op and its facts, once)
from fxpress.backends import CompiledModel, compile, load, register_lowering  # noqa: A004
from fxpress.ir import Graph, NodeInfo, capture, verify
from fxpress.passes import (Pass, PassContext, PassManager, PassResult, parse_pipeline, register_pass,
                            registered_passes)

__version__ = "0.1.0"


def trace(model, example_inputs, name: str | None = None) -> Graph:
    """Capture with torch.fx.symbolic_trace (module-level nodes; simple models only)."""
    return capture(model, example_inputs, method="symbolic_trace", name=name)


__all__ = [
    "ArtifactError", "CalibrationError", "CaptureError", "CompiledModel", "FxpressError", "Graph",
    "LoweringError", "compile", "load", "register_lowering",
    "NodeInfo", "NumericError", "Pass", "PassContext", "PassError", "PassManager", "PassResult",
    "PipelineError", "PreconditionError", "VerificationError", "ZooError", "capture", "parse_pipeline",
    "register_pass", "registered_passes", "trace", "verify", "__version__",
]
