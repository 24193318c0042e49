"""Method configs and their registry (one dataclass per method, found by name)."""
from __future__ import annotations

from typing import Callable, ClassVar, Dict, List, TypeVar

from ..engine.plan import Plan, PruningRequest

_REGISTRY: Dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a method config available as ``get_method(name, **params)``."""

    def deco(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"name: method '{name}' is already registered")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> List[str]:
    return sorted(_REGISTRY)


def get_method(name: str, **params):
    """Instantiate a registered method config; unknown names raise with the list of known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method '{name}'; available: {', '.join(available_methods())}")
    return _REGISTRY[name](**params)


class LayerMethod:
    """Base of in-decoder methods: a config that validates itself and builds a per-prefill ``Plan``."""

    name: ClassVar[str] = ""

    def validate_for(self, num_layers: int) -> None:
        """Check the config against a decoder with ``num_layers`` layers (raise naming the parameter)."""

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:  # pragma: no cover - interface
        """Visual tokens each layer sees, for a sample with ``visual_tokens`` visual tokens."""
        raise NotImplementedError


def check_layer_index(param: str, value: int, num_layers: int, low: int = 1) -> None:
    if not low <= value < num_layers:
        raise ValueError(
            f"{param}: layer {value} is outside the decoder; expected {low} <= {param} < {num_layers} "
            f"(number of decoder layers)"
        )


__all__ = ["LayerMethod", "available_methods", "check_layer_index", "get_method", "register"]
