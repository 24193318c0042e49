"""Host adapters: one small class per host model, declaring what it provides and installing its hooks.

A host adapter knows one model family (where its decoder, vision tower and projector are, how its
visual tokens are laid out) and nothing about methods: it provides *needs* (``shared.needs``) and
reports each prefill to the session (``PruningSession.prefill``). Adapters register themselves by
name; ``host_for(model)`` finds the one that recognises a model.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type

from torch import nn

from ..needs import check_known

_HOSTS: Dict[str, Type["HostAdapter"]] = {}

#: attribute under which a session is reachable from a host model while it is active (for patch hooks)
SESSION_ATTR = "_shared_pruning_session"


class HostAdapter:
    """Base of host adapters.

    Subclasses set ``name``, ``always`` (needs provided whatever the options), ``optional`` (need →
    the option that provides it), ``options`` (accepted keyword options with their defaults) and
    implement ``matches``, ``decoder`` and ``install``.
    """

    name: ClassVar[str] = ""
    always: ClassVar[FrozenSet[str]] = frozenset({"decoder"})
    optional: ClassVar[Mapping[str, str]] = {}
    options: ClassVar[Mapping[str, Any]] = {}
    #: whether the host splices every visual token and prunes before the LLM through the engine's
    #: ``input_keep`` (native models) rather than collapsing the sequence itself (forks)
    engine_always: ClassVar[bool] = False
    #: whether the host's patch series routes its decoder's forward to ``PruningSession.decoder_forward``
    #: (otherwise the session replaces the decoder's ``forward`` for the block)
    decoder_patched: ClassVar[bool] = False

    def __init__(self, model: nn.Module, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"{unknown[0]}: not an option of host '{self.name}'; its options are "
                f"{', '.join(sorted(self.options)) or 'none'}"
            )
        self.model = model
        self.opts: Dict[str, Any] = {**self.options, **options}
        self.check_options()

    # ------------------------------------------------------------------ declared
    def check_options(self) -> None:
        """Validate ``self.opts`` (raise naming the option)."""

    def provides(self) -> FrozenSet[str]:
        got = set(self.always) | {need for need, opt in self.optional.items() if self.opts.get(opt) is not None}
        return check_known(got, f"host '{self.name}'")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def decoder(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def install(self, session: Any, stack: ExitStack) -> None:  # pragma: no cover - interface
        """Install this host's hooks for ``session`` on ``stack`` (removed when the session ends)."""
        raise NotImplementedError

    def attach_points(self) -> List[nn.Module]:
        """Modules on which patch hooks look the session up (``session_of``)."""
        return [self.model]

    def top_model(self) -> nn.Module:
        """The module whose ``generate`` is one generation (wrapped by the session)."""
        return self.model


def register_host(cls: Type[HostAdapter]) -> Type[HostAdapter]:
    if not cls.name or cls.name in _HOSTS:
        raise ValueError(f"name: host adapter name {cls.name!r} is empty or already registered")
    check_known(cls.always, f"host '{cls.name}'")
    check_known(cls.optional, f"host '{cls.name}'")
    _HOSTS[cls.name] = cls
    return cls


def host_names() -> List[str]:
    _load_all()
    return sorted(_HOSTS)


def host_class(name: str) -> Type[HostAdapter]:
    _load_all()
    if name not in _HOSTS:
        raise ValueError(f"host: unknown host '{name}'; available: {', '.join(host_names())}")
    return _HOSTS[name]


def host_for(model: nn.Module, name: Optional[str] = None, **options: Any) -> HostAdapter:
    """The adapter of ``model``: by ``name``, or the registered adapter that recognises it."""
    _load_all()
    if name is not None:
        return host_class(name)(model, **options)
    found = [cls for cls in _HOSTS.values() if cls.matches(model)]
    if len(found) != 1:
        raise TypeError(
            f"model: {'no' if not found else 'more than one'} host adapter recognises {type(model).__name__}"
            f"{'' if not found else ' (' + ', '.join(c.name for c in found) + ')'}; pass host= one of "
            f"{', '.join(host_names())}"
        )
    return found[0](model, **options)


def session_of(module: nn.Module) -> Any:
    """The session active on ``module`` (a host model or its decoder), or None."""
    return module.__dict__.get(SESSION_ATTR)


def _load_all() -> None:
    from . import chat_scene, hf_llava, hf_onevision, lisa, llava_3d, llava_next  # noqa: F401 - registration


def option_tuple(value: Any) -> Tuple[Any, ...]:
    """A per-sample option given for one sample (not a list) or for several."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


__all__ = [
    "HostAdapter",
    "SESSION_ATTR",
    "host_class",
    "host_for",
    "host_names",
    "option_tuple",
    "register_host",
    "session_of",
]
