"""Semantics-preserving cleanup passes: dead code, constant folding, batch-norm fusion."""
from fxpress.passes.cleanup import dce, fold_constants, fuse_batchnorm  # noqa: F401
