"""llmos: a causal language model that keeps learning from new text and feedback while it serves."""

__version__ = "0.1.0"
