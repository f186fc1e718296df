"""Width: Minitron structured pruning of attention heads, key/value heads, MLP neurons and hidden channels."""
from fxpress.passes.width import prune_width  # noqa: F401
