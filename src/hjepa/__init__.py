"""hjepa: hierarchical Joint-Embedding Predictive Architecture for self-supervised learning."""

__version__ = "0.1.0"
