"""Single-row matmuls (batch-1 linears): packed weights, the GEMV schedule, exact against eager."""
from __future__ import annotations

import re

import pytest
import torch

from fxpress import backends
from fxpress.ir import capture

GEMV_MARK = '"fxpress.schedule": "gemv"'


class LinearGelu(torch.nn.Module):
    """A linear with a bias and a fused GELU epilogue."""

    def __init__(self, depth: int, columns: int):
        super().__init__()
        self.linear = torch.nn.Linear(depth, columns)

    def forward(self, x):
        return torch.nn.functional.gelu(self.linear(x))


def _compile(model: torch.nn.Module, x: torch.Tensor, folder):
    """(compiled, eager output, scheduled TIR text) for `model` on `x`."""
    model = model.eval()
    graph = capture(model, (x,), name=type(model).__name__.lower())
    compiled = backends.compile(graph, "llvm", dump_ir=folder)
    with torch.no_grad():
        expected = model(x)
    return compiled, expected, (folder / "02_scheduled.tir.py").read_text()


def _prim_funcs(script: str) -> dict[str, str]:
    """Function name -> its text, for the PrimFuncs of a scheduled module dump."""
    parts = re.split(r"\n    @T\.prim_func", script)
    return {re.search(r"def (\w+)\(", part).group(1): part for part in parts[1:]}


@pytest.mark.parametrize("depth,columns,bias", [
    (576, 192, False),  # packed: 192 = 3 panels of 64 (or 4 of 48), two segments of k
    (100, 37, False),  # K and N multiples of no vector: the transposed weight, one odd-width panel
    (40, 131, False),  # a prime N > one panel: whole-vector panels, the last one predicated
    (64, 200, True),  # N = 4 x 50: an odd panel width, the bias fused into the write-back
    (256, 96, True),  # packed, two segments of k, bias + GELU after the panels' reshape
])
def test_single_row_linear_is_scheduled_as_gemv_and_matches_eager(tmp_path, depth, columns, bias):
    torch.manual_seed(0)
    model = LinearGelu(depth, columns) if bias else torch.nn.Linear(depth, columns, bias=False)
    x = torch.randn(1, 1, depth)
    compiled, expected, script = _compile(model, x, tmp_path)
    assert torch.allclose(compiled(x), expected, atol=1e-4, rtol=1e-4)
    matmuls = {name: text for name, text in _prim_funcs(script).items() if "matmul" in name}
    assert matmuls and all(GEMV_MARK in text for text in matmuls.values()), script
    assert all("tirx.is_scheduled" in text for text in _prim_funcs(script).values())


def test_weights_of_single_row_linears_are_packed_in_panels(tmp_path):
    from fxpress.backends.tvm.gemv_schedule import PANEL_COLUMNS

    model = torch.nn.Linear(64, 512, bias=False)
    _, _, script = _compile(model, torch.randn(1, 1, 64), tmp_path)
    panels = re.search(r"def main_transform_params.*?-> R\.Tuple\(R\.Tensor\(\((\d+), 64, (\d+)\)", script, re.S)
    assert panels is not None, script
    count, width = int(panels.group(1)), int(panels.group(2))
    assert count * width == 512 and width <= PANEL_COLUMNS and count > 1


@pytest.mark.parametrize("rows", [4, 13])
def test_matmuls_with_several_rows_are_left_to_the_matmul_rule(tmp_path, rows):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 128, bias=False)
    x = torch.randn(1, rows, 64)
    compiled, expected, script = _compile(model, x, tmp_path)
    assert torch.allclose(compiled(x), expected, atol=1e-4, rtol=1e-4)
    assert GEMV_MARK not in script
    assert "main_transform_params" in script and "(2, 64, 64)" not in script  # the weight is not packed


@pytest.mark.parametrize("rows,packed", [(28, True), (100, False)])
def test_weights_of_few_row_linears_are_packed_from_a_quarter_megabyte(tmp_path, rows, packed):
    """MiniLM's linears (28 token rows, 0.6-2.4 MB weights, 42 MB in all) read the transposed weight
    48 columns per 6 KB row, a new page per k, from memory on every call: 30 GMAC/s.  From panels
    the model ran 0.79x the time.  With many rows the matmul reuses each weight row from cache and
    the transpose of the result would cost more than it saves: those keep the transposed layout."""
    from fxpress.backends.tvm.gemv_schedule import FEW_ROWS, PANEL_MIN_BYTES

    depth, columns = 256, 384
    assert depth * columns * 4 >= PANEL_MIN_BYTES and (rows <= FEW_ROWS) == packed
    torch.manual_seed(0)
    model = LinearGelu(depth, columns)
    x = torch.randn(1, rows, depth)
    compiled, expected, script = _compile(model, x, tmp_path)
    assert torch.allclose(compiled(x), expected, atol=1e-4, rtol=1e-4)
    panels = re.search(rf"def main_transform_params.*?-> R\.Tuple\(.*?R\.Tensor\(\((\d+), {depth}, (\d+)\)", script, re.S)
    assert (panels is not None) == packed, script
    if packed:
        assert int(panels.group(1)) * int(panels.group(2)) == columns and int(panels.group(1)) > 1
    assert GEMV_MARK not in script


class AttentionOutput(torch.nn.Module):
    """The output projection after attention: the heads' transpose and reshape, then a linear."""

    def __init__(self, depth: int, columns: int):
        super().__init__()
        self.linear = torch.nn.Linear(depth, columns)

    def forward(self, q):
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.linear(a.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


def test_a_linear_lowered_as_a_broadcast_batched_matmul_takes_one_packed_weight(tmp_path):
    """After attention the linear arrives as a batched matmul of both operands broadcast to the batch
    (MiniLM's output projection); its weight was lifted as one copy per batch row, read unpacked."""
    torch.manual_seed(0)
    model = AttentionOutput(256, 384)
    q = torch.randn(2, 4, 14, 64)
    compiled, expected, script = _compile(model, q, tmp_path)
    assert torch.allclose(compiled(q), expected, atol=1e-4, rtol=1e-4)
    transform = re.search(r"def main_transform_params.*?-> (R\.Tuple\(.*?\)):", script, re.S).group(1)
    assert ", 256, 48)" in transform or ", 256, 32)" in transform, transform
    assert "(2, 256, 384)" not in transform, transform


@pytest.mark.parametrize("columns,lanes", [(1536, 16), (576, 8), (49152, 16), (200, 16), (37, 8), (96, 16)])
def test_panel_width_divides_the_columns_in_whole_vectors_when_it_can(columns, lanes):
    from fxpress.backends.tvm.gemv_schedule import PANEL_COLUMNS, panel_width

    width = panel_width(columns, lanes)
    assert 1 <= width <= max(PANEL_COLUMNS, lanes)
    if any(columns % w == 0 for w in range(lanes, PANEL_COLUMNS + 1, lanes)):
        assert width % lanes == 0 and columns % width == 0


@pytest.mark.parametrize("rows,depth", [(12, 64), (13, 64), (512, 576)])
def test_large_weights_of_several_row_linears_are_packed_in_tile_wide_panels(tmp_path, monkeypatch, rows, depth):
    """A vocabulary head (49152 x 576, 113 MB) read its transposed weight 16 columns per 196 KB row:
    SmolLM2's 128-token prefill head ran 302 ms, 105 ms from panels.  The size threshold is lowered
    here so a small linear takes the same path; 13 rows also pad to whole row tiles, and 512 rows of
    576 (more than L2) once sent the panels to the row-reduction rule (9.4 s at 512 tokens)."""
    from fxpress.backends.tvm import gemv_schedule

    monkeypatch.setattr(gemv_schedule, "LARGE_WEIGHT_BYTES", depth * 160 * 4)
    torch.manual_seed(0)
    model = LinearGelu(depth, 160)
    x = torch.randn(1, rows, depth)
    compiled, expected, script = _compile(model, x, tmp_path)
    assert torch.allclose(compiled(x), expected, atol=1e-4, rtol=1e-4)
    panels = re.search(rf"def main_transform_params.*?-> R\.Tuple\(.*?R\.Tensor\(\((\d+), {depth}, (\d+)\)", script, re.S)
    assert panels is not None and int(panels.group(1)) * int(panels.group(2)) == 160, script
    assert GEMV_MARK not in script and "matmul_rf" not in script  # the matmul rule, not a row reduction
    small = torch.nn.Linear(depth, 128, bias=False)  # under the threshold: the transposed weight
    _, _, script = _compile(small, x, tmp_path / "small")
    assert f"(2, {depth}, 64)" not in script and f", {depth}, 16)" not in script


@pytest.mark.parametrize("tokens,padded", [(50, False), (47, True)])
def test_linears_over_a_dynamic_batch_take_panels_and_match_eager(tmp_path, tokens, padded):
    """A dynamic build cannot tell one image from 64, so its linears of a quarter megabyte or more take
    their weight in panels as its static few-row builds do (a width-384 ViT at 50 tokens and batch 1
    ran 1.33x its static build with the transposed layout).  47 rows per image pad to 48 around the
    product, and the bias, the slice and the GELU are its epilogue: one kernel."""
    from fxpress.backends.tvm.gemv_schedule import PANEL_MIN_BYTES

    depth, columns = 128, 512
    assert depth * columns * 4 >= PANEL_MIN_BYTES
    torch.manual_seed(0)
    model = LinearGelu(depth, columns).eval()
    graph = capture(model, (torch.randn(2, tokens, depth),), dynamic={0: {0: "batch"}}, name="linear-gelu")
    compiled = backends.compile(graph, "llvm", dynamic=True, max_sizes=64, dump_ir=tmp_path)
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    kernels = [name for name in _prim_funcs(script) if "matmul" in name]
    assert len(kernels) == 1 and "matmul_panels" in kernels[0], kernels
    assert ("strided_slice" in kernels[0] and "fast_gelu" in kernels[0]) == padded, kernels
    assert ("pad" in "".join(_prim_funcs(script))) == padded
    panels = re.search(rf"def main_transform_params.*?-> R\.Tuple\(.*?R\.Tensor\(\((\d+), {depth}, (\d+)\)", script, re.S)
    assert panels is not None and int(panels.group(1)) * int(panels.group(2)) == columns, script
    for batch in (1, 3):
        x = torch.randn(batch, tokens, depth)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [None, 47])
def test_a_dynamic_linear_of_ragged_width_takes_zero_padded_panels(tmp_path, tokens):
    """A classifier head of 1000 columns over a dynamic batch: no panel width divides 1000, and with
    the transposed layout the matmul rule padded the weight to whole tiles inside the kernel, a copy
    of 0.75 MB on every call (0.36 ms of a 7 ms ViT at batch 1, against 0.14 in its static build).
    The weight is padded with zero columns to whole panels at load time and the product's extra
    columns are sliced off in its epilogue, the bias added after them: one kernel.  With 47 token rows
    per image, padded to 48, one slice takes off the extra rows and columns."""
    depth, columns = 192, 1000
    torch.manual_seed(0)
    model = torch.nn.Linear(depth, columns).eval()
    rows = () if tokens is None else (tokens,)
    graph = capture(model, (torch.randn(2, *rows, depth),), dynamic={0: {0: "batch"}}, name="head")
    compiled = backends.compile(graph, "llvm", dynamic=True, max_sizes=64, dump_ir=tmp_path)
    script = (tmp_path / "02_scheduled.tir.py").read_text()
    kernels = {name: text for name, text in _prim_funcs(script).items() if "matmul" in name}
    assert len(kernels) == 1, list(kernels)
    name, text = next(iter(kernels.items()))
    assert re.fullmatch(r"fused_matmul_panels\d*_strided_slice\d*_add\d*", name), name
    pads = [name for name in _prim_funcs(script) if "pad" in name]  # the weight's (load time), 47 rows'
    assert len(pads) == 1 + (tokens is not None), pads
    assert not re.search(rf"\({depth}, {columns + 8}\)|_pad\b|_pad =", text), text  # no copy of the weight
    panels = re.search(rf"def main_transform_params.*?-> R\.Tuple\(.*?R\.Tensor\(\((\d+), {depth}, (\d+)\)", script, re.S)
    assert panels is not None, script
    count, width = int(panels.group(1)), int(panels.group(2))
    assert count * width > columns > (count - 1) * width, (count, width)
    for batch in (1, 3):
        x = torch.randn(batch, *rows, depth)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_dynamic_linears_of_small_weights_keep_the_transposed_layout(tmp_path):
    torch.manual_seed(0)
    model = LinearGelu(64, 128).eval()  # 32 KB
    graph = capture(model, (torch.randn(2, 50, 64),), dynamic={0: {0: "batch"}}, name="linear-gelu")
    compiled = backends.compile(graph, "llvm", dynamic=True, max_sizes=64, dump_ir=tmp_path)
    assert "matmul_panels" not in (tmp_path / "02_scheduled.tir.py").read_text()
    x = torch.randn(3, 50, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
