"""Pass, PassResult, PassContext: the contract every compression method follows.

A pass is a small registered dataclass whose fields are its options:

    @register_pass
    @dataclass(frozen=True)
    class RemoveLayers(Pass):
        '''blocks[i] -> identity for the least important blocks.'''
        name: ClassVar[str] = "remove-layers"
        ratio: float = 0.25

Options are frozen (a pass is a value: `str(pass)` round-trips) and a bad
value raises `OptionError` through `self.bad_option(...)`.  The manager
calls `requires(graph, ctx)` first (PreconditionError when the pass cannot
work here), then the pass, then `ensures(graph)` on a modified result.
`creates` declares the `fxpress::` ops the pass may insert, so a pipeline
is checked against a target before anything runs.  Calling a pass returns a
PassResult; it never changes the graph it was given (the PassManager
checks).  A pass with nothing to do returns the input graph with
`modified=False` and a `reason` in its stats.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol

import torch

from fxpress.analysis.manager import AnalysisCache
from fxpress.errors import OptionError, PreconditionError
from fxpress.ir.graph import Graph
from fxpress.passes.infra.losses import default_task_loss
from fxpress.passes.infra.registry import format_pass


@dataclass
class PassResult:
    """What a pass returns: the new graph, whether it changed, and what it did."""

    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    preserved: tuple = ()  # analyses (fxpress.analysis.manager) still valid on the new graph


class Progress(Protocol):
    """Reports progress of long work; the CLI supplies a rich progress bar."""

    def track(self, items: Iterable, description: str, total: int | None = None) -> Iterator: ...


class NullProgress:
    """Progress that shows nothing (library default)."""

    def track(self, items: Iterable, description: str, total: int | None = None) -> Iterator:
        return iter(items)


@dataclass
class PassContext:
    """Everything a pass may use besides the graph. Passes never reach for globals."""

    calibration: list[tuple] = field(default_factory=list)
    teacher: Any = None  # a Graph or nn.Module giving reference outputs
    seed: int = 0
    device: str = "cpu"
    progress: Progress = field(default_factory=NullProgress)
    analyses: AnalysisCache = field(default_factory=AnalysisCache)  # shared, cached analyses
    # The task loss `loss(output, batch) -> scalar tensor` that importance scores, gradients and
    # distillation use; None = the default (next-token cross-entropy for causal-LM logits).  Encoders
    # set a retrieval loss here (fxpress.training.losses.contrastive_loss on paired batches).
    loss: Callable[[Any, tuple], torch.Tensor] | None = None

    def batches(self, graph: Graph) -> list[tuple]:
        """Calibration batches, or the graph's example inputs when none were given."""
        return list(self.calibration) or [graph.example_inputs]

    def require_calibration(self, pass_name: str) -> list[tuple]:
        if not self.calibration:
            raise PreconditionError("needs calibration data; pass calibration batches in the "
                                    "PassContext (or --calibration on the command line)", pass_name)
        return list(self.calibration)

    def require_teacher(self, pass_name: str) -> Any:
        if self.teacher is None:
            raise PreconditionError("needs a teacher model; set PassContext(teacher=...) to the "
                                    "original model or graph", pass_name)
        return self.teacher

    def task_loss(self, output: Any, batch: tuple, reference: Any = None) -> torch.Tensor:
        """The task loss of `output` on `batch`: `self.loss` when set, else next-token cross-entropy for
        causal-LM logits or the error relative to `reference` (the unmodified model's output)."""
        if self.loss is not None:
            return self.loss(output, batch)
        return default_task_loss(output, batch, reference)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def rng(self) -> random.Random:
        return random.Random(self.seed)


class Pass:
    """Base of every pass: subclasses are registered dataclasses (see module docstring)."""

    name: ClassVar[str] = "pass"
    preserves_semantics: ClassVar[bool] = True
    creates: ClassVar[tuple] = ()  # the fxpress ops this pass may insert (a backend must lower them)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Precondition, checked by the manager before the pass runs: raise PreconditionError when the
        graph or context cannot be worked on (saying why and what to do).  Default: anything goes."""

    def ensures(self, graph: Graph) -> None:
        """Postcondition on the graph a pass returned with modified=True: raise PostconditionError
        when it does not hold.  Default: nothing beyond the manager's own checks."""

    def __call__(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(graph, ctx)")

    def bad_option(self, message: str) -> OptionError:
        """The one error for an option value the pass cannot use (raise it from __post_init__)."""
        return OptionError(f"pass '{self.name}': {message}")

    def __str__(self) -> str:
        return format_pass(self)

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring: the rewrite in one line."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
