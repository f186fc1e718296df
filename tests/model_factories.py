"""Small models for the cleanup-pass tests: constant subgraphs, conv+bn, linear+bn, generated stacks."""
from __future__ import annotations

import copy

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine weights (so fusion does real work)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                count = module.num_features
                module.running_mean.copy_(torch.randn(count, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(count, generator=generator) * 1.5 + 0.25)
                if module.affine:
                    module.weight.copy_(torch.rand(count, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(count, generator=generator) * 0.5)
    return model


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Identity and a copy of every parameter and buffer, to check a model was left alone."""
    return {name: (id(t), t.detach().clone()) for name, t in
            list(model.named_parameters()) + list(model.named_buffers())}


def unchanged(model: nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> bool:
    now = snapshot(model)
    return now.keys() == before.keys() and all(
        now[k][0] == before[k][0] and torch.equal(now[k][1], before[k][1]) for k in before)


class ConstantSubgraph(nn.Module):
    """Buffers transformed in forward (foldable), a literal arange, and a transposed parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.register_buffer("log_scale", torch.randn(8) * 0.1)
        self.register_buffer("offset", torch.randn(8))

    def forward(self, x):
        scale = self.log_scale.exp() * 2.0
        positions = torch.arange(8, dtype=torch.float32) / 8.0
        y = self.fc(x) * scale + (self.offset - positions)
        return y + self.fc.weight.t().sum(0)


class ConvBnRelu(nn.Module):
    """conv+bn+relu twice (the second conv without bias), pooling, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class LinearBn1d(nn.Module):
    """linear+bn1d+relu, then a bias-free linear+bn1d with a non-affine BatchNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn1 = nn.Linear(6, 12), nn.BatchNorm1d(12)
        self.fc2, self.bn2 = nn.Linear(12, 5, bias=False), nn.BatchNorm1d(5, affine=False)

    def forward(self, x):
        return self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))


class Conv1dBn(nn.Module):
    """conv1d+bn1d on sequences, then a depthwise conv2d+bn2d on the same values as images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)
        self.depthwise, self.bn2d = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn2d(self.depthwise(y.unsqueeze(-1).expand(-1, -1, -1, 2)))


class SequenceLinearBn(nn.Module):
    """Linear on (N, L, C) then BatchNorm1d: BN normalises dim 1 (L), not linear's features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


class PlainMlp(nn.Module):
    """linear-relu-linear, seeded: nothing for either cleanup pass to do, no residual blocks."""

    def __init__(self, inputs: int = 8, hidden: int = 16, outputs: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(inputs, hidden), nn.Linear(hidden, outputs)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class LargeExpand(nn.Module):
    """A 4 KB buffer expanded to 2 MB: foldable, but too large to be worth storing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("row", torch.linspace(0, 1, 1000))

    def forward(self, x):
        return x + self.row.expand(512, 1000)


class SharedConv(nn.Module):
    """A conv whose output also feeds a second branch: not fusable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class MutatedBuffer(nn.Module):
    """A buffer written in place in forward: it is not a constant."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(4))

    def forward(self, x):
        self.calls.add_(1.0)
        return x * (self.calls * 2.0)


class NoisyBuffer(nn.Module):
    """A random op on a buffer: never folded."""

    def __init__(self):
        super().__init__()
        self.register_buffer("base", torch.ones(4))

    def forward(self, x):
        return x + torch.rand_like(self.base) * 0.0 + self.base * 3.0


# -- a tiny LLaMA (random weights, 4 decoder layers) for the depth tests ----------------------
VOCAB = 64


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    """A random LlamaForCausalLM (GQA, tied embeddings) wrapped to return logits; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fxpress.zoo import CausalLMLogits

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return CausalLMLogits(LlamaForCausalLM(config)).eval()


def token_batches(count: int, seed: int = 1, shape: tuple[int, int] = (2, 8)) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, shape, generator=generator),) for _ in range(count)]


def skip_layers(model: nn.Module, removed: list[int]) -> nn.Module:
    """Hand-built eager reference: a copy of a wrapped HF model without the given layers."""
    reference = copy.deepcopy(model)
    inner = reference.model
    base = inner.model if hasattr(inner, "model") else inner
    container_owner, attr = (base, "layers") if hasattr(base, "layers") else (base.encoder, "layer")
    layers = getattr(container_owner, attr)
    setattr(container_owner, attr, nn.ModuleList(m for i, m in enumerate(layers) if i not in removed))
    inner.config.num_hidden_layers = len(layers) - len(removed)
    return reference.eval()


class TuningBlock(nn.Module):
    """A linear, GELU and softmax: three small functions for MetaSchedule to tune (local and over RPC)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return nn.functional.gelu(self.fc(x)).softmax(-1)
