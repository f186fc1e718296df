"""Token reduction: merge tokens after attention (ToMe, Token Transforming), drop a 1D sequence tail."""
from fxpress.passes.tokens import merge_tokens, tail_drop  # noqa: F401
