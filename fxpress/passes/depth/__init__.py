"""Depth compression: remove blocks by importance, share block weights, distill the tail."""
from fxpress.passes.depth import distill, remove_layers, share_weights  # noqa: F401
