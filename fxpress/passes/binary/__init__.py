"""Binary networks: binarize layers, reuse XNOR channels along a minimum spanning tree."""
from fxpress.passes.binary import binarize, xnor_mst  # noqa: F401
