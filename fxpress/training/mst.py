"""MST regularizer and fine-tuning: train a binary network towards cheaper channel reuse.

The cost `xnor-mst` pays per output position of a binary layer is
K + (total Hamming weight of the minimum spanning tree over its output
channels).  The tree's total weight is piecewise constant in the latent
weights, so training minimises a differentiable surrogate (MST-compression,
Vo et al., ICCV 2023, made concrete here):

    R = sum_layers positions_l * sum_{(i,j) in MST_l} sum_p (s(w_i[p]) - s(w_j[p]))^2 / 4
        / sum_layers positions_l * C_l * K_l,         s(w) = tanh(sharpness * w / mean|W_l|)

For hard signs each edge term is exactly the Hamming distance |D(i,j)|, so
R is the MST part of the network's bit-ops as a fraction of its dense
bit-ops.  The tree edges are recomputed from the current signs every
`refresh_every` steps (networkx, as in `xnor-mst`); between refreshes
the gradient pulls each channel's latent weights towards its tree
neighbours' signs.  The loss is cross-entropy + reg_weight * R (the
straight-through estimator of the binary layers carries the task
gradient) while the measured dense/MST bit-ops ratio is below
`target_ratio`; a recovery phase then trains only the float layers and
BatchNorm, so the signs (and the bit-ops) stay as they are.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fxpress.errors import ZooError
from fxpress.passes.binary.xnor_mst import hamming_distances, spanning_tree
from fxpress.zoo.bnn import BinaryConv2d, BinaryDigitsNet, BinaryLinear
from fxpress.zoo.datasets import ImageDataset
from fxpress.zoo.fixture_io import fixture_paths, load_fixture
from fxpress.zoo.training import TrainConfig, random_affine

log = logging.getLogger(__name__)


def binary_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The BinaryConv2d / BinaryLinear modules of `model` by path."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (BinaryConv2d, BinaryLinear))}


def output_positions(model: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of each layer (OH * OW for convolutions, 1 for linear)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
             for name, module in layers.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: math.prod(shape[2:]) if len(shape) == 4 else math.prod(shape[1:-1]) for name, shape in shapes.items()}


def _signs(weight: torch.Tensor) -> torch.Tensor:
    return ~(weight.detach().reshape(weight.shape[0], -1) >= 0)


class MSTRegularizer:
    """Differentiable surrogate of the network's MST bit-ops fraction (see the module docstring)."""

    def __init__(self, layers: dict[str, nn.Module], positions: dict[str, int], sharpness: float = 4.0):
        if not layers:
            raise ValueError("MSTRegularizer needs at least one binary layer")
        self.layers, self.positions, self.sharpness = layers, positions, sharpness
        self.edges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense = sum(positions[n] * m.weight.shape[0] * m.weight[0].numel() for n, m in layers.items())
        self.refresh()

    def refresh(self) -> dict[str, int]:
        """Recompute every layer's MST from the current signs; return the trees' total weights."""
        weights = {}
        for name, module in self.layers.items():
            negative = _signs(module.weight).numpy()
            tree = spanning_tree(hamming_distances(negative))
            pairs = torch.tensor(sorted(tree.edges()), dtype=torch.int64).reshape(-1, 2)
            self.edges[name] = (pairs[:, 0], pairs[:, 1])
            weights[name] = int(tree.size(weight="weight"))
        return weights

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        for name, module in self.layers.items():
            weight = module.weight.reshape(module.weight.shape[0], -1)
            soft = torch.tanh(self.sharpness * weight / weight.abs().mean().detach().clamp_min(1e-12))
            left, right = self.edges[name]
            total = total + self.positions[name] * ((soft[left] - soft[right]) ** 2).sum() / 4
        return total / self.dense

    def mst_bitops(self, tree_weights: dict[str, int]) -> int:
        """MST bit-ops per sample given each layer's tree weight (as `refresh` returns them)."""
        return sum(self.positions[n] * (m.weight[0].numel() + tree_weights[n]) for n, m in self.layers.items())

    def bitops(self) -> tuple[int, int]:
        """(dense, MST) bit-ops per sample with the current signs (refreshes the trees)."""
        return self.dense, self.mst_bitops(self.refresh())


@dataclass(frozen=True)
class MSTFinetuneConfig:
    """Fine-tuning settings (stored in the fine-tuned fixture's JSON)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    reg_weight: float = 1.0  # weight of the MST surrogate R (a fraction of dense bit-ops) in the loss
    sharpness: float = 4.0  # tanh(sharpness * w / mean|W|) stands in for sign(w)
    refresh_every: int = 10  # steps between recomputing the trees
    target_ratio: float = 5.5  # dense / MST bit-ops at which the regularizer pauses (inf: never)
    recover_epochs: int = 8  # then train only float layers and BatchNorm (signs fixed)
    max_shift_px: float = 0.5  # augmentation, as bnn-digits was trained
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneResult:
    """What fine-tuning did: bit-ops per sample before and after, time, per-epoch history."""

    dense_bitops: int
    mst_bitops_before: int
    mst_bitops_after: int
    seconds: float
    steps: int
    history: list[dict] = field(default_factory=list)

    @property
    def ratio_before(self) -> float:
        return self.dense_bitops / self.mst_bitops_before

    @property
    def ratio_after(self) -> float:
        return self.dense_bitops / self.mst_bitops_after


def _cosine_lr(step: int, total: int, peak: float) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def _run_epochs(model: nn.Module, params: list, train: ImageDataset, config: MSTFinetuneConfig, epochs: int,
                regularizer: MSTRegularizer | None, generator: torch.Generator) -> list[dict]:
    """Adam with cosine lr over `params`; loss = CE (+ reg_weight * R when a regularizer is given)."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    augment = TrainConfig(max_shift_px=config.max_shift_px)
    total, step, history = epochs * math.ceil(len(train) / config.batch_size), 0, []
    active = regularizer is not None
    for epoch in range(epochs):
        model.train()
        sums = {"loss": 0.0, "reg": 0.0}
        for batch in torch.randperm(len(train), generator=generator).split(config.batch_size):
            if regularizer is not None and step % config.refresh_every == 0:
                active = regularizer.dense / regularizer.mst_bitops(regularizer.refresh()) < config.target_ratio
            images = train.images[batch]
            if config.max_shift_px:
                images = random_affine(images, augment, generator)
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, total, config.lr)
            task = F.cross_entropy(model(images), train.labels[batch])
            reg = regularizer() if regularizer is not None and active else torch.zeros(())
            optimizer.zero_grad(set_to_none=True)
            (task + config.reg_weight * reg).backward()
            optimizer.step()
            sums["loss"] += task.item() * len(batch)
            sums["reg"] += reg.item() * len(batch)
            step += 1
        model.eval()
        history.append({"loss": sums["loss"] / len(train), "reg": sums["reg"] / len(train)})
        log.info("epoch %d/%d loss %.4f reg %.4f", epoch + 1, epochs, history[-1]["loss"], history[-1]["reg"])
    return history


def finetune_mst(model: nn.Module, train: ImageDataset,
                 config: MSTFinetuneConfig = MSTFinetuneConfig()) -> FinetuneResult:
    """Fine-tune `model` in place: CE + reg_weight * MST surrogate, then a recovery phase.

    The recovery phase (`recover_epochs`) trains only the parameters that are
    not binary weights (float layers, BatchNorm): the signs, and so the
    bit-ops, stay as the regularized phase left them.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    layers = binary_layers(model)
    model.eval()
    regularizer = MSTRegularizer(layers, output_positions(model, layers, train.images[:2]), config.sharpness)
    dense, before = regularizer.bitops()
    start = time.perf_counter()
    history = _run_epochs(model, list(model.parameters()), train, config, config.epochs, regularizer, generator)
    binary_weights = {id(module.weight) for module in layers.values()}
    others = [p for p in model.parameters() if id(p) not in binary_weights]
    history += _run_epochs(model, others, train, config, config.recover_epochs, None, generator)
    _, after = regularizer.bitops()
    steps = (config.epochs + config.recover_epochs) * math.ceil(len(train) / config.batch_size)
    return FinetuneResult(dense, before, after, time.perf_counter() - start, steps, history)


FINETUNED_FIXTURE = "bnn-digits-mst"
FINETUNE_SCRIPT = "scripts/finetune_bnn_mst.py"


def fixture_digest(name: str) -> str:
    """sha256 of a fixture's weights file (ties a fine-tuned fixture to the one it started from)."""
    weights, _ = fixture_paths(name)
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def load_finetuned(check_source: bool = True) -> tuple[nn.Module, dict]:
    """The shipped MST-regularized bnn-digits (eval mode) and its JSON record.

    With `check_source`, a ZooError if bnn-digits was retrained since
    (the record holds the sha256 of the weights it was fine-tuned from).
    """
    state, meta = load_fixture(FINETUNED_FIXTURE, FINETUNE_SCRIPT)
    if check_source and meta.get("source_sha256") != fixture_digest("bnn-digits"):
        raise ZooError(f"fixture {FINETUNED_FIXTURE} was fine-tuned from other bnn-digits weights than the "
                       f"shipped ones; recreate it with `python {FINETUNE_SCRIPT}`")
    model = BinaryDigitsNet(**meta["config"])
    model.load_state_dict(state)
    return model.float().eval(), meta
