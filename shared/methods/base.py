"""Method configs and their registry (one dataclass per method, found by name)."""
from __future__ import annotations

import numbers
from typing import Callable, ClassVar, Dict, FrozenSet, List, Optional, TypeVar

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
    #: where the method acts: "llm" (a plan inside the decoder) or "pre_llm" (before the projector)
    stage: ClassVar[str] = "llm"
    #: whether the plan ranks with the request's ``query_index``
    uses_query: ClassVar[bool] = True
    #: whether the plan starts from a pre-LLM ``visual_selection`` (LVLM_CSP's clustering stage)
    uses_selection: ClassVar[bool] = False
    #: "original" (tokens keep their LLM-input positions) or "compact" (renumbered after each drop)
    positions: str = "original"

    def needs(self) -> FrozenSet[str]:
        """What the method needs from its host (``shared.needs.NEEDS``)."""
        return frozenset({"decoder"})

    def validate_for(self, num_layers: int) -> None:
        """Check the config against a decoder with ``num_layers`` layers (raise naming the parameter)."""

    def make_plan(self, request: PruningRequest, num_layers: int) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError

    def schedule(self, visual_tokens: int, num_layers: int) -> List[int]:  # pragma: no cover - interface
        """Visual tokens each layer sees, for a sample with ``visual_tokens`` visual tokens."""
        raise NotImplementedError


def as_int(param: str, value: object, low: Optional[int] = None, meaning: str = "an int") -> int:
    """``value`` as an int: Python/numpy/torch integers are accepted, bools, floats and strings are not."""
    from ..engine.request import is_int

    if not is_int(value):
        raise ValueError(f"{param}: expected {meaning}, got {value!r} ({type(value).__name__})")
    v = int(value)  # type: ignore[call-overload]
    if low is not None and v < low:
        raise ValueError(f"{param}: expected {meaning} >= {low}, got {v}")
    return v


def as_fraction(param: str, value: object, low_open: bool = True, meaning: str = "a fraction") -> float:
    """``value`` as a float in (0, 1] (``low_open``) or [0, 1]; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{param}: expected {meaning} (a number), got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        raise ValueError(f"{param}: expected {meaning} in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return v


def check_layer_index(param: str, value: int, num_layers: int, low: int = 1) -> None:
    if not low <= value < num_layers:
        raise ValueError(
            f"{param}: layer {value} is outside the decoder; expected {low} <= {param} < {num_layers} "
            f"(number of decoder layers)"
        )


__all__ = ["LayerMethod", "as_fraction", "as_int", "available_methods", "check_layer_index", "get_method", "register"]
