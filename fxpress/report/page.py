"""One self-contained HTML page: sections of tables, inline SVG charts and expandable panels.

No request leaves the page: styles are inline, charts are SVG written by
matplotlib into the document, and panels are HTML ``<details>`` (they open
without script).  A little script adds "expand all / collapse all".

    report = Report("vit-mnist: merge-tokens")
    report.add_table("passes", ["pass", "time"], [["dce", "0.01 s"]])
    report.add_figure("MACs by block", fig)
    report.write("run.html")
"""
from __future__ import annotations

import datetime
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;
 color:#1d2330;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #d5d9e2;margin-top:2rem}
.meta{color:#5b6477;font-size:.9rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #d5d9e2;padding:.25rem .55rem;text-align:left;vertical-align:top}
td{max-width:26rem}td.code{overflow-wrap:anywhere;min-width:14rem}th{background:#f0f2f7;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.unchanged td{color:#7a8294}
details{border:1px solid #d5d9e2;border-radius:4px;margin:.5rem 0;padding:.3rem .6rem}
details>summary{cursor:pointer;font-weight:600;overflow-wrap:anywhere}
details[open]>summary{margin-bottom:.4rem}
pre{background:#f6f7fa;padding:.5rem;overflow-x:auto;font-size:.8rem;max-height:24rem}
figure{margin:.8rem 0}figure svg{max-width:100%;height:auto}figcaption{color:#5b6477;font-size:.85rem}
.note{color:#5b6477;font-size:.88rem}.toolbar button{margin-right:.4rem}
.bad{color:#b3261e}.good{color:#1e7a3c}
"""

SCRIPT = """
document.querySelectorAll('button[data-details]').forEach(function (button) {
  button.addEventListener('click', function () {
    var open = button.dataset.details === 'open';
    document.querySelectorAll('details.diff').forEach(function (d) { d.open = open; });
  });
});
"""


@dataclass
class Section:
    title: str
    body: str
    anchor: str


@dataclass
class Report:
    """An HTML report built section by section; `write` saves it as one file."""

    title: str
    subtitle: str = ""
    sections: list[Section] = field(default_factory=list)
    _figures: int = 0

    def add_html(self, title: str, body: str, anchor: str | None = None) -> Section:
        """A section with a trusted HTML body (built by this package, already escaped)."""
        section = Section(title, body, anchor or _anchor(title, len(self.sections)))
        self.sections.append(section)
        return section

    def add_table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "",
                  anchor: str | None = None) -> Section:
        """A section holding one table; cells are escaped; numbers are right-aligned."""
        body = table_html(headers, rows) + (f'<p class="note">{html.escape(note)}</p>' if note else "")
        return self.add_html(title, body, anchor)

    def add_figure(self, title: str, figure: Any, caption: str = "", anchor: str | None = None) -> Section:
        """A section holding one matplotlib figure (a `matplotlib.figure.Figure`) as inline SVG."""
        self._figures += 1
        return self.add_html(title, figure_html(figure, caption, f"f{self._figures}"), anchor)

    def render(self) -> str:
        """The whole page as a string."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in self.sections)
        body = "".join(f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{s.body}</section>'
                       for s in self.sections)
        subtitle = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{subtitle}<p class=\"meta\">written by fxpress, {stamp}</p>"
                f"<nav><ul>{toc}</ul></nav>{body}<script>{SCRIPT}</script></body></html>\n")

    def write(self, path: str | Path) -> Path:
        """Write the page; returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path


def _anchor(title: str, index: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return f"s{index}-{slug}" if slug else f"s{index}"


class Code(str):
    """Cell text shown as code that may wrap anywhere (pass texts, node lines)."""


def cell_html(value: Any) -> str:
    """A table cell: numbers right-aligned (ints with thousands separators, floats to 4 significant digits)."""
    if isinstance(value, bool) or value is None:
        return f"<td>{'-' if value is None else ('yes' if value else 'no')}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, Code):
        return f'<td class="code"><code>{html.escape(value)}</code></td>'
    return f"<td>{html.escape(str(value))}</td>"


def table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]], row_classes: Sequence[str] = ()) -> str:
    """An HTML table; `row_classes` gives each row a CSS class (e.g. "unchanged")."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    lines = []
    for index, row in enumerate(rows):
        css = row_classes[index] if index < len(row_classes) and row_classes[index] else ""
        cells = "".join(cell_html(v) for v in row)
        lines.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def figure_html(figure: Any, caption: str, salt: str) -> str:
    """A matplotlib figure as an inline <svg> in a <figure>; ids are salted so several SVGs share a page."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):  # text as paths: no fonts
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    svg = buffer.getvalue()
    svg = _prefix_ids(svg[svg.index("<svg"):], salt)  # no XML prolog or DOCTYPE inside HTML
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart">{svg}{caption_html}</figure>'


def _prefix_ids(svg: str, prefix: str) -> str:
    """Every id of an SVG (and each reference to it) prefixed, so the glyph and clip-path ids that
    matplotlib writes into each figure stay unique on a page holding several."""
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', svg)
    return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", svg)


def details_html(summary: str, body: str, css: str = "diff", anchor: str = "",
                 data: dict[str, str] | None = None) -> str:
    """An expandable panel (closed by default); `data` become data-* attributes."""
    ident = f' id="{anchor}"' if anchor else ""
    extra = "".join(f' data-{k}="{html.escape(v)}"' for k, v in (data or {}).items())
    return f'<details class="{css}"{ident}{extra}><summary>{html.escape(summary)}</summary>{body}</details>'


def pre_html(lines: Sequence[str], more: int = 0) -> str:
    text = "\n".join(lines) + (f"\n... and {more} more" if more > 0 else "")
    return f"<pre>{html.escape(text)}</pre>"
