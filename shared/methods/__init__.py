"""Pruning methods and baselines, one module each, all registered by name.

In the LLM (engine plans): FastV, PyramidDrop, LVLM_CSP, Fast3D, seeded random. Before the LLM (vision-side reducers and
selectors): PruMerge, PruMerge+, VisionZip, SeGPruner.
"""
from .base import LayerMethod, available_methods, get_method, register
from .fast3d import Fast3D
from .fastv import FastV
from .lvlm_csp import LVLMCSP
from .prumerge import PruMerge, PruMergePlus
from .pyramid_drop import PyramidDrop
from .random_drop import RandomDrop
from .segpruner import SeGPruner
from .visionzip import VisionZip

__all__ = [
    "Fast3D",
    "FastV",
    "LVLMCSP",
    "LayerMethod",
    "PruMerge",
    "PruMergePlus",
    "PyramidDrop",
    "RandomDrop",
    "SeGPruner",
    "VisionZip",
    "available_methods",
    "get_method",
    "register",
]
