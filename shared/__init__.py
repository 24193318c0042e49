"""shared: visual-token pruning for 2D and 3D multimodal LLMs.

``shared.prune(model, method, ...)`` runs any registered method on any host that provides its needs
(``shared.session``); the in-decoder engine (``shared.engine``) runs the hosts' own decoders
(transformers 4.31 → 5.x); methods are dataclass configs (``shared.methods``); efficiency accounting
reproduces the papers' figures (``shared.accounting``).
"""
from .engine import pruning
from .methods import (
    AdaToken3D,
    Fast3D,
    FastV,
    LVLMCSP,
    PruMerge,
    PruMergePlus,
    PyramidDrop,
    RandomDrop,
    SeGPruner,
    VisionZip,
    available_methods,
    get_method,
)
from .session import ForwardRecord, PruningSession, prune

__version__ = "0.1.0"
__all__ = [
    "AdaToken3D",
    "Fast3D",
    "FastV",
    "ForwardRecord",
    "LVLMCSP",
    "PruMerge",
    "PruMergePlus",
    "PruningSession",
    "PyramidDrop",
    "RandomDrop",
    "SeGPruner",
    "VisionZip",
    "available_methods",
    "get_method",
    "prune",
    "pruning",
    "__version__",
]
