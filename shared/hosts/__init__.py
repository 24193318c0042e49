"""Glue between hosts and the engine: native transformers models here, forks' patch hooks per host."""
from .hf_native import find_decoder, prune

__all__ = ["find_decoder", "prune"]
