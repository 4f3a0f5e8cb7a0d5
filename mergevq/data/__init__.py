"""Datasets: the embedded digits demo set and ImageNet-style ImageFolder trees.

Every dataset yields (image, label) with image a float tensor (3, R, R) in [-1, 1].
"""
from mergevq.data.datasets import DatasetError, build_dataset, digits_arrays

__all__ = ["DatasetError", "build_dataset", "digits_arrays"]
