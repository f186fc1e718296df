"""Rich output for the `fxpress` command: tables and progress bars."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fxpress.passes import PassReport

# Pipes and CI logs get wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_WIDTH)
errors = Console(stderr=True, width=_WIDTH)


class RichProgress:
    """The PassContext progress reporter for the command line."""

    def track(self, items: Iterable, description: str, total: int | None = None) -> Iterator:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=errors, transient=True) as progress:
            yield from progress.track(items, total=total, description=description)


def human(count: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:g}"


def _delta(before: int, after: int) -> str:
    if before == after:
        return human(after)
    return f"{human(after)} ({(after - before) / before * 100:+.1f}%)" if before else human(after)


def pass_table(reports: list[PassReport]) -> Table:
    """Per-pass table: time, modified, nodes, params, MACs, bytes, error."""
    table = Table(title="passes")
    for column in ("pass", "time", "modified", "nodes", "params", "MACs", "bytes", "max abs err", "cosine"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for report in reports:
        error = report.error or {}
        table.add_row(
            report.pass_text, f"{report.time_s:.2f}s", "yes" if report.modified else "no",
            _delta(report.before["nodes"], report.after["nodes"]),
            _delta(report.before["params"], report.after["params"]),
            _delta(report.before["macs"], report.after["macs"]),
            _delta(report.before["bytes"], report.after["bytes"]),
            f"{error['max_abs']:.2e}" if error else "-", f"{error['cosine']:.6f}" if error else "-")
    return table


def compare_table(title: str, rows: dict[str, tuple[object, object]]) -> Table:
    """Two-column before/after table with a ratio where both are numbers."""
    table = Table(title=title)
    for column in ("", "before", "after", "after/before"):
        table.add_column(column, justify="right" if column else "left")
    for label, (before, after) in rows.items():
        ratio = f"{after / before:.3f}" if isinstance(before, (int, float)) and before else "-"
        table.add_row(label, _fmt(before), _fmt(after), ratio)
    return table


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
