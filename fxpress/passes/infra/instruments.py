"""Instruments: debugging and checking kept out of pass bodies.

Each instrument sees the pipeline start, every pass before and after, and
the pipeline end.  The PassManager calls them in the order given.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, TextIO

from fxpress.errors import NumericError
from fxpress.ir.graph import Graph
from fxpress.ir.numerics import compare_outputs, tolerance_for
from fxpress.ir.verify import verify

if TYPE_CHECKING:
    from fxpress.passes.infra.base import Pass, PassContext, PassResult
    from fxpress.passes.infra.manager import PassReport

log = logging.getLogger(__name__)


class Instrument:
    """Base instrument: every hook does nothing."""

    def before_pipeline(self, graph: Graph, ctx: PassContext) -> None: ...

    def before_pass(self, pass_: Pass, graph: Graph, ctx: PassContext) -> None: ...

    def after_pass(self, pass_: Pass, before: Graph, result: PassResult, ctx: PassContext,
                   report: PassReport) -> None: ...

    def after_pipeline(self, graph: Graph, reports: list[PassReport]) -> None: ...


class LogTiming(Instrument):
    """Logs each pass's wall time (the manager measures it) at INFO level."""

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        log.info("%-40s %8.3f s  modified=%s", report.pass_text, report.time_s, report.modified)


@dataclass
class PrintAfterPass(Instrument):
    """Writes the text form of the graph after every pass to `stream` (or the log)."""

    stream: TextIO | None = None
    collapse: int | None = None

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        from fxpress.ir.printer import format_graph

        text = f"// after {report.pass_text}\n{format_graph(result.graph, collapse=self.collapse)}\n"
        if self.stream is None:
            log.info("%s", text)
        else:
            self.stream.write(text)


@dataclass
class DumpToDir(Instrument):
    """Writes `000_capture.txt`, `001_<pass>.txt`, ... (and .dot/.json when asked) to a folder.

    writers: formats beyond the printer's, by name (fxpress.export.graph_files.GRAPH_FILE_WRITERS
    adds model-explorer, onnx and pt2); every format is checked when the instrument is made.
    changed_only: after the capture, dump only the passes that modified the graph; the files keep
    the pass's position in the pipeline, so a gap in the numbers is a pass that did nothing.
    A format that cannot be written for some graph (ONNX has no form of the ops passes insert) is
    a logged warning, recorded in `failed`, not a failed pipeline.
    """

    directory: Path | str
    formats: tuple[str, ...] = ("txt",)
    writers: Mapping[str, Callable[[Graph, Path, str], Path]] | None = None
    changed_only: bool = False
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    _index: int = 0

    def __post_init__(self) -> None:
        from fxpress.ir.printer import check_dump_formats

        self.formats = check_dump_formats(tuple(self.formats), self.writers)

    def before_pipeline(self, graph, ctx) -> None:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        self._index = 0
        self._dump(graph, "capture")

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        if self.changed_only and not result.modified:
            self._index += 1  # the number stays taken: the gap shows the pass changed nothing
            return
        self._dump(result.graph, pass_.name)

    def _dump(self, graph: Graph, label: str) -> None:
        from fxpress.errors import FxpressError
        from fxpress.ir.printer import write_dump

        stem = f"{self._index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}"
        self._index += 1
        for fmt in self.formats:
            try:
                paths = write_dump(graph, Path(self.directory), stem, (fmt,), writers=self.writers)
            except FxpressError as err:
                log.warning("could not dump %s as %s: %s", stem, fmt, err)
                self.failed.append(f"{stem}.{fmt}: {err}")
                continue
            self.written.extend(path for path in paths if path not in self.written)


class VerifyAfterPass(Instrument):
    """Lints the graph and checks its metadata after every pass (and before the first)."""

    def before_pipeline(self, graph, ctx) -> None:
        verify(graph)

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        from fxpress.errors import VerificationError

        try:
            verify(result.graph)
        except VerificationError as err:
            raise VerificationError(f"graph fails verification after the pass: {err}",
                                    pass_.name, report.ran_before) from err


@dataclass
class NumericCheck(Instrument):
    """Compares each pass's outputs with the previous graph's on calibration batches.

    Semantics-preserving passes must stay within tolerance (NumericError
    otherwise); lossy passes get their error recorded in the report, both
    against the previous graph and against the graph the pipeline started with.
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    max_batches: int = 4
    _reference: list[Any] = field(default_factory=list)

    def before_pipeline(self, graph, ctx) -> None:
        self._reference = [graph(*batch) for batch in ctx.batches(graph)[: self.max_batches]]

    def after_pass(self, pass_, before, result, ctx, report) -> None:
        if not result.modified:
            return
        batches = ctx.batches(before)[: self.max_batches]
        worst, worst_vs_start = None, None
        for batch, start_out in zip(batches, self._reference):
            expected, actual = before(*batch), result.graph(*batch)
            error = compare_outputs(expected, actual)
            if pass_.preserves_semantics and not error.within(tolerance_for(expected, self.rtol, self.atol)):
                raise NumericError(
                    f"a semantics-preserving pass changed the outputs: max abs error {error.max_abs:.3g}, "
                    f"cosine {error.cosine:.6f} (tolerance rtol={self.rtol}, atol={self.atol})",
                    pass_.name, report.ran_before)
            worst = error if worst is None or error.max_abs > worst.max_abs else worst
            vs_start = compare_outputs(start_out, actual)
            worst_vs_start = vs_start if worst_vs_start is None or vs_start.max_abs > worst_vs_start.max_abs \
                else worst_vs_start
        report.error = {"max_abs": worst.max_abs, "cosine": worst.cosine,
                        "max_abs_vs_start": worst_vs_start.max_abs, "cosine_vs_start": worst_vs_start.cosine}
