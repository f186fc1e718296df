"""A recipe: one YAML file that says how to compress a model, read the same by the CLI and by Python.

    model: smollm2                   # optional; `fxpress run MODEL --recipe` must name the same model
    pipeline: "remove-layers{count=6},distill{steps=40}"   # or a list of pass strings
    calibration: {source: shakespeare, split: train, batches: 4}
    teacher: self                    # self (the input model) or a MODEL spec
    target: eager                    # eager, or a compilation target (llvm, onnx, native, ...)
    tuning: {trials: 0, dir: null}
    eval: {source: default, items: 64}
    export: {hf: out/hf, compiled: null}
    report: run.html
    seed: 0

Loading checks the structure without importing torch (:func:`load_recipe` with ``deep=False``, what the
command line does before the slow imports); :meth:`Recipe.check` then checks what needs the registries:
the pipeline parses, the data sources exist, the target is known.  Every error is a RecipeError of one
line naming the key (``calibration.batches``), the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fxpress.errors import RecipeError

SELF_TEACHER = "self"
EAGER = "eager"


@dataclass(frozen=True)
class Calibration:
    """Where calibration batches come from: a source (``default``, ``text:FILE`` or a dataset name), the
    split of a dataset source, and how many batches (0: none)."""

    source: str = "default"
    split: str = "train"
    batches: int = 4


@dataclass(frozen=True)
class Tuning:
    """MetaSchedule trials for target llvm (0: default schedules) and the tuning database folder."""

    trials: int = 0
    dir: str | None = None


@dataclass(frozen=True)
class Evaluation:
    """The metric before and after the pipeline: its source and how many items to score (None: the default)."""

    source: str = "default"
    items: int | None = None


@dataclass(frozen=True)
class Export:
    """Folders to write: the compressed model as a Hugging Face folder, the compiled model (needs a target)."""

    hf: str | None = None
    compiled: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A checked recipe (see the module doc); ``where`` names its file in error messages."""

    pipeline: str
    model: str | None = None
    calibration: Calibration = Calibration()
    teacher: str = SELF_TEACHER
    target: str = EAGER
    tuning: Tuning = Tuning()
    eval: Evaluation | None = None
    export: Export = Export()
    report: str | None = None
    seed: int = 0
    where: str = field(default="recipe", compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """The recipe `data` describes (a mapping, as YAML gives it); RecipeError on anything malformed."""
        return _read_recipe(data, where)

    def to_dict(self) -> dict[str, Any]:
        """Every key, in the documented order; ``Recipe.from_dict(r.to_dict()) == r``."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "where"}
        return {key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for key, value in data.items()}

    def to_yaml(self) -> str:
        """YAML text that loads back to an equal recipe."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some keys changed, checked again (``recipe.replace(target="llvm")``)."""
        data = self.to_dict()
        for key, value in changes.items():
            data[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return _read_recipe(data, self.where)

    def check(self) -> Recipe:
        """The checks that need fxpress's registries (imports torch): the pipeline parses and the target can
        lower it, the data sources and split exist.  Returns the recipe."""
        from fxpress.recipes.checks import check_recipe

        check_recipe(self)
        return self

    def fail(self, key: str, message: str) -> RecipeError:
        """A RecipeError about `key` of this recipe (``r.yaml: calibration.source: ...``)."""
        return RecipeError(f"{self.where}: {key}: {message}")


def load_recipe(path: str | Path, deep: bool = True) -> Recipe:
    """Read and check the YAML recipe at `path`; `deep=False` skips the checks that import torch."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {getattr(err, 'strerror', None) or err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{place}: {problem}") from err
    recipe = Recipe.from_dict(data, where=str(path))
    return recipe.check() if deep else recipe


def model_matches(wanted: str, *given: str | None) -> bool:
    """Whether a recipe's `model` names one of `given` (a zoo name, or the same file or folder)."""
    for name in given:
        if name is None:
            continue
        if name == wanted or Path(name).expanduser().resolve() == Path(wanted).expanduser().resolve():
            return True
    return False


def check_model(recipe: Recipe, spec: str) -> None:
    """RecipeError unless MODEL (as given on the command line) is the model the recipe names (if any)."""
    if recipe.model is not None and not model_matches(recipe.model, spec):
        raise recipe.fail("model", f"the recipe is for {recipe.model!r}, and MODEL is {spec!r}; "
                                   "run the recipe's model or change its `model` key")


# -- reading ---------------------------------------------------------------------------------------------

def _read_recipe(data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys ({_allowed(Recipe)}), "
                          f"got {_describe(data)}")
    _check_keys(data, Recipe, "", where)
    if "pipeline" not in data:
        raise RecipeError(f"{where}: pipeline: missing; a recipe needs a pipeline "
                          "(a string such as \"fold-constants,dce\" or a list of pass strings)")
    reader = _Reader(where)
    recipe = Recipe(
        pipeline=reader.pipeline(data["pipeline"]),
        model=reader.optional_text(data.get("model"), "model"),
        calibration=reader.calibration(data.get("calibration", {})),
        teacher=reader.text(data.get("teacher", SELF_TEACHER), "teacher"),
        target=reader.text(data.get("target", EAGER), "target"),
        tuning=reader.section(data.get("tuning", {}), Tuning, "tuning", {"trials": (0, 0), "dir": ""}),
        eval=None if data.get("eval") is None else reader.section(
            data["eval"], Evaluation, "eval", {"source": "", "items": (1, None)}),
        export=reader.section(data.get("export", {}), Export, "export", {"hf": "", "compiled": ""}),
        report=reader.optional_text(data.get("report"), "report"),
        seed=reader.integer(data.get("seed", 0), "seed", 0),
        where=where,
    )
    if recipe.export.compiled and recipe.target == EAGER:
        raise RecipeError(f"{where}: export.compiled: {recipe.export.compiled!r} saves a compiled model, and "
                          f"target is eager; set target (llvm, onnx, native, ...) or drop export.compiled")
    return recipe


@dataclass
class _Reader:
    """Typed readers for recipe values; each error names the key path, the value and what is allowed."""

    where: str

    def fail(self, key: str, value: Any, wanted: str) -> RecipeError:
        return RecipeError(f"{self.where}: {key}: {_describe(value)} is not allowed; want {wanted}")

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, "a non-empty string")
        return value.strip()

    def optional_text(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, value, "a non-empty string or null")
        return value.strip()

    def integer(self, value: Any, key: str, minimum: int, optional: bool = False) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, value, f"an integer >= {minimum}" + (" or null" if optional else ""))
        return value

    def pipeline(self, value: Any) -> str:
        if isinstance(value, list):
            if not value or not all(isinstance(item, str) and item.strip() for item in value):
                raise self.fail("pipeline", value, "a pipeline string or a non-empty list of pass strings")
            return ",".join(item.strip() for item in value)
        if not isinstance(value, str) or not value.strip():
            raise self.fail("pipeline", value, "a pipeline string (e.g. \"fold-constants,dce\") or a list of "
                                               "pass strings")
        return value.strip()

    def calibration(self, value: Any) -> Calibration:
        """A mapping, or a shorthand: an integer (batches of the default source) or a source name."""
        if isinstance(value, int) and not isinstance(value, bool):
            return Calibration(batches=self.integer(value, "calibration", 0))
        if isinstance(value, str):
            return Calibration(source=self.text(value, "calibration.source"))
        return self.section(value, Calibration, "calibration", {"source": "", "split": "", "batches": (0, 0)})

    def section(self, value: Any, cls: type, key: str, kinds: dict[str, Any]) -> Any:
        """A nested mapping read into `cls`: kinds maps each field to "" (a string; optional when the
        default is None) or (minimum, default) for an integer."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, value, f"a mapping with keys {_allowed(cls)}")
        _check_keys(value, cls, f"{key}.", self.where)
        defaults = cls()
        values = {}
        for name, kind in kinds.items():
            raw = value.get(name, getattr(defaults, name))
            optional = getattr(defaults, name) is None
            if isinstance(kind, tuple):
                values[name] = self.integer(raw, f"{key}.{name}", kind[0], optional)
            else:
                values[name] = self.optional_text(raw, f"{key}.{name}") if optional else \
                    self.text(raw, f"{key}.{name}")
        return cls(**values)


def _check_keys(data: dict, cls: type, prefix: str, where: str) -> None:
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "where"]
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"{where}: unknown key '{prefix}{key}'{hint}; allowed: {_allowed(cls, prefix)}")


def _allowed(cls: type, prefix: str = "") -> str:
    return ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(cls) if f.name != "where")


def _describe(value: Any) -> str:
    """A bad value as an error shows it: its text and type, shortened."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


__all__ = ["Calibration", "EAGER", "Evaluation", "Export", "Recipe", "RecipeError", "SELF_TEACHER", "Tuning",
           "check_model", "load_recipe", "model_matches"]
