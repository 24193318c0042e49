"""shared: visual-token pruning for 2D and 3D multimodal LLMs.

One engine (``shared.engine``) runs every in-decoder method on the hosts' own decoders
(transformers 4.31 → 5.x); methods are dataclass configs (``shared.methods``); efficiency
accounting reproduces the papers' figures (``shared.accounting``).
"""
from .engine import pruning
from .methods import FastV, PyramidDrop, available_methods, get_method

__version__ = "0.1.0"
__all__ = ["FastV", "PyramidDrop", "available_methods", "get_method", "pruning", "__version__"]
