"""The IR: capture, Graph with per-node metadata, printing, verification, views."""
from fxpress.ir.capture import capture
from fxpress.ir.graph import Graph, NodeInfo
from fxpress.ir.verify import verify

__all__ = ["Graph", "NodeInfo", "capture", "verify"]
