"""Pruning methods and baselines, one module each, all registered by name.

In the LLM (engine plans): FastV, PyramidDrop, AdaToken-3D, LVLM_CSP, Fast3D, seeded random. Before the LLM
(vision-side reducers and selectors): PruMerge, PruMerge+, VisionZip, SeGPruner. Fast3D's compat mode
(``Fast3DCompat``, ``compat``) brings its own key-masking runner and is a mode of Fast3D/FastV, not a registered method.
"""
from .adatoken import AdaToken3D, AdaTokenSchedule
from .base import LayerMethod, available_methods, get_method, register
from .fast3d import Fast3D
from .fast3d_compat import Fast3DCompat, compat
from .fastv import FastV
from .lvlm_csp import LVLMCSP
from .prumerge import PruMerge, PruMergePlus
from .pyramid_drop import PyramidDrop
from .random_drop import RandomDrop
from .segpruner import SeGPruner
from .visionzip import VisionZip

__all__ = [
    "AdaToken3D",
    "AdaTokenSchedule",
    "Fast3D",
    "Fast3DCompat",
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
    "compat",
    "get_method",
    "register",
]
