"""The pass infrastructure: the Pass contract, the registry of passes by name, the manager and instruments."""
from fxpress.passes.infra.base import NullProgress, Pass, PassContext, PassResult, Progress
from fxpress.passes.infra.instruments import (DumpToDir, Instrument, LogTiming, NumericCheck, PrintAfterPass,
                                              VerifyAfterPass)
from fxpress.passes.infra.manager import PassManager, PassReport, PipelineResult, check_inputs
from fxpress.passes.infra.registry import (format_pipeline, make_pass, parse_pipeline, register_pass,
                                           registered_passes)

__all__ = [
    "DumpToDir", "Instrument", "LogTiming", "NullProgress", "NumericCheck", "Pass", "PassContext",
    "PassManager", "PassReport", "PassResult", "PipelineResult", "PrintAfterPass", "Progress",
    "VerifyAfterPass", "check_inputs", "format_pipeline", "make_pass", "parse_pipeline",
    "register_pass", "registered_passes",
]
