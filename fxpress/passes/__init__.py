"""Passes: the infrastructure and one module per compression method."""
from fxpress.passes.infra import NullProgress, Pass, PassContext, PassResult, Progress
from fxpress.passes.instruments import (DumpToDir, Instrument, LogTiming, NumericCheck,
                                        PrintAfterPass, VerifyAfterPass)
from fxpress.passes.manager import PassManager, PassReport, PipelineResult, check_inputs
from fxpress.passes.registry import (format_pipeline, make_pass, parse_pipeline, register_pass,
                                     registered_passes)

__all__ = [
    "DumpToDir", "Instrument", "LogTiming", "NullProgress", "NumericCheck", "Pass", "PassContext",
    "PassManager", "PassReport", "PassResult", "PipelineResult", "PrintAfterPass", "Progress",
    "VerifyAfterPass", "check_inputs", "format_pipeline", "make_pass", "parse_pipeline",
    "register_pass", "registered_passes",
]

# Built-in passes register themselves on import.
from fxpress.passes import dce  # noqa: E402,F401
from fxpress.passes import fold_constants, fuse_batchnorm  # noqa: E402,F401
from fxpress.passes import binarize  # noqa: E402,F401
from fxpress.passes import xnor_mst  # noqa: E402,F401
from fxpress.passes import merge_tokens, tail_drop  # noqa: E402,F401
from fxpress.passes import distill, remove_layers, share_weights  # noqa: E402,F401
