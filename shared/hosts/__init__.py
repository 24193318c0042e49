"""Glue between hosts and ``shared``: the forks' patch hooks (``lisa``, ``llava_next``), the
pre-LLM selection context (``selection``) and native transformers paths (``hf_native``,
``hf_onevision``). Host modules import their host's classes lazily."""
from .hf_native import find_decoder, prune

__all__ = ["find_decoder", "prune"]
