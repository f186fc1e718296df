"""Passes: the infrastructure (`infra/`) and one folder per method family.

The built-in passes are registered here, in one place: importing a family
module defines its pass classes and `register_pass` adds them by name.
"""
from fxpress.passes.infra import (DumpToDir, Instrument, LogTiming, NullProgress, NumericCheck, Pass,
                                  PassContext, PassManager, PassReport, PassResult, PipelineResult,
                                  PrintAfterPass, Progress, VerifyAfterPass, check_inputs, format_pipeline,
                                  make_pass, parse_pipeline, register_pass, registered_passes)
from fxpress.passes import binary, cleanup, depth, lowrank, quant, sparsity, tokens, width  # noqa: E402,F401  (registers the built-in passes)

__all__ = [
    "DumpToDir", "Instrument", "LogTiming", "NullProgress", "NumericCheck", "Pass", "PassContext",
    "PassManager", "PassReport", "PassResult", "PipelineResult", "PrintAfterPass", "Progress",
    "VerifyAfterPass", "check_inputs", "format_pipeline", "make_pass", "parse_pipeline",
    "register_pass", "registered_passes",
]
