"""Pruning methods and baselines, one module each, all registered by name.

In the LLM (engine plans): FastV, PyramidDrop, LVLM_CSP. Before the LLM (vision-side reducers and
selectors): PruMerge, PruMerge+, VisionZip, SeGPruner.
"""
from .base import LayerMethod, available_methods, get_method, register
from .fastv import FastV
from .lvlm_csp import LVLMCSP
from .prumerge import PruMerge, PruMergePlus
from .pyramid_drop import PyramidDrop
from .segpruner import SeGPruner
from .visionzip import VisionZip

__all__ = [
    "FastV",
    "LVLMCSP",
    "LayerMethod",
    "PruMerge",
    "PruMergePlus",
    "PyramidDrop",
    "SeGPruner",
    "VisionZip",
    "available_methods",
    "get_method",
    "register",
]
