"""The dialect: every op a pass inserts, defined once with its facts (OpInfo); ATen facts too.

    aten.py        MAC rules and categories of the ATen ops fxpress reasons about
    flow_rules.py  how a tracked dimension moves through each op
    tokens.py      fxpress::merge_tokens, fxpress::tail_drop (reference kernels, fake kernels, facts)
    binary.py      fxpress::binary_linear / binary_conv2d and their MST-reuse forms
    native_merge.py + token_merge.c   the fused C kernel of bipartite merging (eager CPU path)
    sparse.py      fxpress::sparse_linear (4x1-block / CSR compressed weights); its C kernel: native_sparse.py + sparse_linear.c
    quant.py       fxpress::quantized_linear / quantized_embedding (group-quantized packed weights)
    kv.py          compressed KV-cache forms (quantized groups, merged layer pairs, SnapKV scores) and
                   fxpress::kv_dequantize (a packed cache body restored inside a decode-step graph)

Importing this package defines every op; the `fxpress` package does so once,
when it is imported.  Backends depend on this package, never on passes.
"""
from fxpress.ops import aten, binary, kv, quant, sparse, tokens  # noqa: F401  (defines the ops and their facts)
