"""MergeVQ reproduction: token-merging tokenizers, generators, evaluation and pipeline."""

__version__ = "0.1.0"
