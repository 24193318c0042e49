"""Pruning methods and baselines, one module each, all registered by name."""
from .base import LayerMethod, available_methods, get_method, register
from .fastv import FastV
from .pyramid_drop import PyramidDrop

__all__ = ["FastV", "LayerMethod", "PyramidDrop", "available_methods", "get_method", "register"]
