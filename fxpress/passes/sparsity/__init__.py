"""Sparsity: second-order (Optimal BERT Surgeon) weight pruning, and sparse kernels where they pay off."""
from fxpress.passes.sparsity import prune_obs  # noqa: F401
from fxpress.passes.sparsity import sparse_kernels  # noqa: F401
