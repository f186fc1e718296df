"""What `fxpress.compress` returns: the compressed graph and everything around it."""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fxpress.backends import CompiledModel
from fxpress.errors import FxpressError
from fxpress.ir import Graph
from fxpress.recipes.recipe import Recipe
from fxpress.zoo import ZooModel

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    """The result of a recipe run.

    ``graph``: the compressed fxpress Graph; ``before``: the captured graph (equal to the input model);
    ``reports``: one PassReport per pass; ``compiled``: the CompiledModel when the recipe has a target,
    else None; ``recipe``: the recipe as run (with the arguments of `compress` applied); ``model``: the
    model as fxpress called it (a Hugging Face model inside its capture wrapper); ``metrics``:
    ``{"perplexity (shakespeare test)": (before, after)}`` when the recipe has ``eval``; ``written``: the
    files and folders the recipe's ``export`` and ``report`` wrote, by key.
    """

    graph: Graph
    before: Graph
    reports: list
    compiled: CompiledModel | None
    recipe: Recipe
    model: ZooModel
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)
    recorder: Any = field(default=None, repr=False)  # the report's RunRecorder, when the recipe asked for one

    def __call__(self, *inputs: Any) -> Any:
        """The compressed graph's outputs (no gradients)."""
        return self.graph(*inputs)

    def to_module(self) -> torch.nn.Module:
        """The compressed model as a plain torch module (a deep copy of the graph's GraphModule)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(self.graph.module)

    def to_hf(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """Write the compressed model as a Hugging Face folder (config + safetensors; the model's own
        tokenizer unless one is given); ArtifactError when the graph has no Hugging Face form."""
        from fxpress.export.hf import export_hf

        return export_hf(self.graph, self.model.module, folder,
                         tokenizer=tokenizer if tokenizer is not None else self.model.tokenizer)

    def save_compiled(self, folder: str | Path) -> Path:
        """Save the compiled model (manifest + weights + library) to `folder`."""
        if self.compiled is None:
            raise FxpressError(f"{self.graph.name} was not compiled: give a target (compress(..., target='llvm') "
                               "or `target:` in the recipe) to save a compiled model")
        return self.compiled.save(Path(folder))

    def write_report(self, path: str | Path) -> Path:
        """Write the HTML report of the run (passes, what each changed, metrics, compilation) to `path`."""
        from fxpress.report import run_report

        compile_info = None
        if self.compiled is not None:
            compile_info = [{"target": self.compiled.target, **_plain(self.compiled.info)}]
        report = run_report(model_name=self.model.name, description=self.model.description,
                            pipeline=self.recipe.pipeline, before=self.before, after=self.graph,
                            reports=self.reports, recorder=self.recorder, metrics=self.metrics or None,
                            compile_info=compile_info)
        return report.write(path)


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """Compile info a table can show: numbers and short strings."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str)) and len(str(v)) < 80}
