"""dop: operation-pruning policies for multimodal LLMs (DOP)."""

__version__ = "0.1.0"
