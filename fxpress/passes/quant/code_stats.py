"""How compressible quantized codes are: Shannon entropy and Huffman code length per weight, and errors.

The entropy (bits per code) is the bound an entropy coder approaches; the Huffman length is what
a per-layer Huffman code of the code values achieves (Polino et al. account model size this way).
"""
from __future__ import annotations

import heapq
import math

import torch
from torch import Tensor


def code_histogram(codes: Tensor, bits: int) -> Tensor:
    """Counts of each of the 2^bits code values."""
    return torch.bincount(codes.reshape(-1).long(), minlength=2 ** bits)


def entropy_bits(counts: Tensor) -> float:
    """Shannon entropy of the distribution `counts` describes, in bits per symbol."""
    total = float(counts.sum())
    if total == 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())


def huffman_lengths(counts: Tensor) -> dict[int, int]:
    """Code length of every symbol that occurs, of a Huffman code built from `counts`."""
    present = [(int(c), symbol) for symbol, c in enumerate(counts.tolist()) if c > 0]
    if len(present) == 1:
        return {present[0][1]: 1}
    heap = [(count, index, [symbol]) for index, (count, symbol) in enumerate(present)]
    heapq.heapify(heap)
    lengths = {symbol: 0 for _, symbol in present}
    tie = len(heap)
    while len(heap) > 1:
        count_a, _, symbols_a = heapq.heappop(heap)
        count_b, _, symbols_b = heapq.heappop(heap)
        for symbol in symbols_a + symbols_b:
            lengths[symbol] += 1
        heapq.heappush(heap, (count_a + count_b, tie, symbols_a + symbols_b))
        tie += 1
    return lengths


def huffman_bits(counts: Tensor) -> float:
    """Mean Huffman code length per symbol, in bits."""
    total = float(counts.sum())
    if total == 0:
        return 0.0
    return sum(int(counts[symbol]) * length for symbol, length in huffman_lengths(counts).items()) / total


def relative_error(weight: Tensor, approx: Tensor) -> float:
    """||W - W_hat||_F / ||W||_F."""
    norm = float(weight.norm())
    return float((weight - approx).norm()) / norm if norm > 0 else 0.0


def output_error(weight: Tensor, approx: Tensor, xtx: Tensor) -> float:
    """||(W - W_hat) X^T|| / ||W X^T|| from the inputs' X^T X: sqrt(tr(D G D^T) / tr(W G W^T))."""
    delta, w, g = (weight - approx).double(), weight.double(), xtx.double()
    denominator = float(((w @ g) * w).sum())
    return math.sqrt(max(float(((delta @ g) * delta).sum()), 0.0) / denominator) if denominator > 0 else 0.0
