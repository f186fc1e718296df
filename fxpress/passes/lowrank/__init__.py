"""Low-rank factorization: a linear or conv2d weight W replaced by two factors U V of a lower rank, by
truncated SVD or activation-aware (whitened) SVD on calibration inputs (`low-rank`)."""
from fxpress.passes.lowrank import low_rank  # noqa: F401
