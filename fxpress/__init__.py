"""fxpress: compress neural networks the way a compiler would.

    import fxpress
    graph = fxpress.capture(model, example_inputs)
    result = fxpress.PassManager("fold-constants,dce").run(graph, fxpress.PassContext())

``import fxpress`` is cheap: it loads the errors only, and changes no
environment variable.  The first use of any other name (``fxpress.capture``,
``fxpress.PassManager``, ...) imports the dialect (``fxpress.ops``: every op
and its facts), the backends (which register the compilation targets) and
the module that defines the name, in that order.  So the command line can
reject a bad invocation before torch is even imported.
"""
from __future__ import annotations

import importlib
from typing import Any

from fxpress.errors import (ArtifactError, CalibrationError, CaptureError, FxpressError, LoweringError,
                            NumericError, PassError, PipelineError, PreconditionError, RecipeError,
                            VerificationError, ZooError)

__version__ = "0.1.0"

_EXPORTS = {
    "fxpress.backends": ("CompiledModel", "compile", "load", "register_lowering"),
    "fxpress.ir": ("Graph", "NodeInfo", "capture", "verify"),
    "fxpress.passes": ("Pass", "PassContext", "PassManager", "PassResult", "parse_pipeline", "register_pass",
                       "registered_passes"),
    "fxpress.recipes.compress": ("compress",),
    "fxpress.recipes.compressed": ("Compressed",),
    "fxpress.recipes.recipe": ("Recipe", "load_recipe"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("analysis", "backends", "cli", "eval", "export", "ir", "ops", "passes", "recipes", "training",
                "utils", "zoo")


def _load_core() -> None:
    """The dialect, then the backends (registering every target): what a public name may rely on."""
    importlib.import_module("fxpress.ops")
    importlib.import_module("fxpress.backends")


def __getattr__(name: str) -> Any:
    if name in _HOME:
        _load_core()
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"fxpress.{name}")
    raise AttributeError(f"module 'fxpress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME) | set(_SUBPACKAGES))


def trace(model, example_inputs, name: str | None = None):
    """Capture with torch.fx.symbolic_trace (module-level nodes; simple models only)."""
    _load_core()
    from fxpress.ir import capture

    return capture(model, example_inputs, method="symbolic_trace", name=name)


__all__ = [
    "ArtifactError", "CalibrationError", "CaptureError", "CompiledModel", "Compressed", "FxpressError", "Graph",
    "LoweringError", "Recipe", "RecipeError", "compile", "compress", "load", "load_recipe", "register_lowering",
    "NodeInfo", "NumericError", "Pass", "PassContext", "PassError", "PassManager", "PassResult",
    "PipelineError", "PreconditionError", "VerificationError", "ZooError", "capture", "parse_pipeline",
    "register_pass", "registered_passes", "trace", "verify", "__version__",
]
