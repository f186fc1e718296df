"""The command line's early target check: refuse a pipeline the target cannot lower before torch loads.

``fxpress run MODEL --pipeline P --target T`` must fail at once when a pass
of P inserts an op T cannot lower.  The facts behind that answer (each
pass's ``creates``, each target's ``can_lower``) live in classes that need
torch, and TVM's in rule modules that need TVM: importing them takes
seconds.  So the answers, computed by the one real check
(:func:`fxpress.passes.infra.targets.check_target`, pass by pass and target
by target), are kept in a small JSON table under the fxpress cache
(``$FXPRESS_CACHE``, else ``~/.cache/fxpress``), keyed by a hash of
fxpress's sources and the Python version.  The first run after an edit or
an upgrade computes it (slowly, once); later runs read it in milliseconds.

A pass the table does not know is left to the full check, which runs when
the pipeline is parsed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from fxpress.errors import FxpressError, PipelineError
from fxpress.utils.cache import cache_root

log = logging.getLogger(__name__)

TABLE_VERSION = 1
PACKAGE = Path(__file__).resolve().parent.parent


def source_key() -> str:
    """sha256 of every fxpress source file (path and bytes), the Python version and the table version."""
    digest = hashlib.sha256(f"{TABLE_VERSION} {sys.version}".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def pass_names(pipeline: str) -> list[str]:
    """The pass names of a pipeline text, options dropped: ``"a{x=1},b"`` -> ``["a", "b"]``.

    Lenient on purpose: a malformed pipeline is reported by the full parser.
    """
    text = pipeline
    while True:
        stripped = re.sub(r"\{[^{}]*\}", "", text)
        if stripped == text:
            break
        text = stripped
    return [part.strip() for part in text.split(",") if part.strip()]


def compute_table() -> dict:
    """Ask the real check about every registered pass and target (imports torch, passes, backends)."""
    import fxpress.ops  # noqa: F401 - the dialect first, as `fxpress.<name>` does
    import fxpress.backends  # noqa: F401 - registers the targets
    from fxpress.passes import registered_passes
    from fxpress.passes.infra.targets import check_target, lowering_targets

    targets = list(lowering_targets())
    refusals: dict[str, dict[str, str]] = {}
    for name, cls in registered_passes().items():
        for target in targets:
            try:
                check_target([cls], target)
            except PipelineError as err:
                refusals.setdefault(name, {})[target] = str(err)
    return {"version": TABLE_VERSION, "targets": targets, "refusals": refusals}


def _read(path: Path, key: str) -> dict | None:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) and table.get("key") == key else None


def _write(path: Path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(table, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
        for stale in path.parent.glob("targets-*.json"):  # tables of earlier sources
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as err:  # a read-only home: the table is recomputed next time
        log.debug("cannot cache the target table at %s: %s", path, err)


def target_table() -> dict:
    """The cached table for these sources; computed and stored when missing or stale."""
    key = source_key()
    path = cache_root() / f"targets-{key[:16]}.json"
    table = _read(path, key)
    if table is None:
        log.info("computing the target table (once per fxpress version) into %s", path)
        table = compute_table() | {"key": key}
        _write(path, table)
    return table


def check_pipeline_target(pipeline: str | None, target: str) -> None:
    """Raise FxpressError for an unknown target, PipelineError for a pass that `target` cannot follow."""
    if target == "eager":
        return
    table = target_table()
    if target not in table["targets"]:
        known = ", ".join(["eager", *sorted(table["targets"])])
        raise FxpressError(f"unknown target '{target}'; available targets: {known}")
    for name in pass_names(pipeline or ""):
        message = table["refusals"].get(name, {}).get(target)
        if message:
            raise PipelineError(message)


__all__ = ["cache_root", "check_pipeline_target", "compute_table", "pass_names", "source_key", "target_table"]
