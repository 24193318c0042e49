"""The command line every host's evaluation shares: methods by name, their arguments, protocol presets.

    --method fastv --method-args layer=2 keep=64
    --pre visionzip --pre-args dominant=54 contextual=10 --method fastv --method-args layer=2 keep=64
    --method lvlm_csp --method-args preset=7b-224/8-64-6-16 clustering=cls
    --preset paper                        # the paper's released protocol for this host (driver-defined)

``--method-args`` values are Python literals (``3``, ``0.5``, ``(8, 16, 24)``, ``True``); anything else is
a string. Each method validates its own fields, so a bad value is refused naming the field.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..methods import available_methods, get_method

NONE = "none"


def add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method``/``--method-args`` (in-LLM or pre-LLM) and ``--pre``/``--pre-args`` (a pre-LLM method
    stacked before an in-LLM one)."""
    names = ", ".join(available_methods())
    g = p.add_argument_group("pruning (shared.get_method)")
    g.add_argument("--method", default=NONE, help=f"a registered method ({names}) or '{NONE}' (unpruned)")
    g.add_argument("--method-args", nargs="*", default=[], metavar="K=V",
                   help="fields of the method's config (e.g. layer=2 keep=64); preset=NAME starts from a method preset")
    g.add_argument("--pre", default=None, help="a pre-LLM method (prumerge, prumerge_plus, visionzip, segpruner) "
                                               "stacked before --method")
    g.add_argument("--pre-args", nargs="*", default=[], metavar="K=V", help="fields of the --pre method's config")


def parse_kv(items: Sequence[str], flag: str) -> Dict[str, Any]:
    """``["k=v", ...]`` → {k: literal(v)}; errors name the flag."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"{flag}: expected K=V pairs, got {item!r}")
        k, v = item.split("=", 1)
        if k in out:
            raise ValueError(f"{flag}: {k!r} given twice")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _build(name: str, kv: Dict[str, Any], flag: str) -> Any:
    if name not in available_methods():
        raise ValueError(f"{flag}: unknown method {name!r}; available: {', '.join(available_methods())}, {NONE}")
    preset_name = kv.pop("preset", None)
    if preset_name is None:
        return get_method(name, **kv)
    presets = getattr(_method_module(name), "PRESETS", None)
    if not presets:
        raise ValueError(f"{flag}: method {name!r} has no presets")
    if preset_name not in presets:
        raise ValueError(f"{flag}: unknown preset {preset_name!r} of {name}; available: {', '.join(sorted(presets))}")
    return dataclasses.replace(presets[preset_name], **kv)


def _method_module(name: str):
    import importlib

    from ..methods.base import _REGISTRY

    return importlib.import_module(_REGISTRY[name].__module__)


def methods_from_args(args: argparse.Namespace) -> List[Any]:
    """The method configs the flags describe (empty for an unpruned run), pre-LLM first."""
    out: List[Any] = []
    if args.pre is not None:
        pre = _build(args.pre, parse_kv(args.pre_args, "--pre-args"), "--pre")
        if getattr(pre, "stage", None) != "pre_llm":
            raise ValueError(f"--pre: {args.pre} acts inside the LLM; give it as --method")
        out.append(pre)
    elif args.pre_args:
        raise ValueError("--pre-args: given without --pre")
    if args.method != NONE:
        m = _build(args.method, parse_kv(args.method_args, "--method-args"), "--method")
        if out and getattr(m, "stage", None) == "pre_llm":
            raise ValueError("--method: two pre-LLM methods; stack a pre-LLM --pre with an in-LLM --method")
        out.append(m)
    elif args.method_args:
        raise ValueError(f"--method-args: given with --method {NONE}")
    return out


def describe(method: Any) -> str:
    """``Name(field=value, ...)`` with the fields that differ from the config's defaults."""
    fields = []
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)  # type: ignore[misc]
        if default is dataclasses.MISSING or v != default:
            j = _jsonable(v)
            fields.append(f"{f.name}={j}" if isinstance(j, str) and j.startswith("<") else f"{f.name}={v!r}")
    return f"{type(method).__name__}({', '.join(fields)})"


def method_label(methods: Sequence[Any]) -> str:
    return " + ".join(describe(m) for m in methods) if methods else "unpruned"


def _jsonable(v: Any) -> Any:
    """A field value for run.json: tuples as lists; objects (e.g. Fast3D's online GAP scorer) by class name
    (the driver records what they were built from, e.g. the GAP checkpoint path)."""
    if isinstance(v, tuple):
        v = list(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def method_settings(methods: Sequence[Any]) -> List[Dict[str, Any]]:
    """JSON-able description of the methods (for run.json): name and every field."""
    out = []
    for m in methods:
        fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)}
        out.append({"name": m.name, **{k: _jsonable(v) for k, v in fields.items()}})
    return out


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, Any]],
                 name: Optional[str]) -> Tuple[str, List[str]]:
    """Set the flags of protocol preset ``name`` that were left at their defaults.

    Returns (protocol label, the preset's flags the user overrode). The label is ``name`` when every flag
    of the preset is in effect, ``name*`` (with the overrides listed) otherwise, ``custom`` without one."""
    if name is None:
        return "custom", []
    if name not in presets:
        raise ValueError(f"--preset: unknown preset {name!r}; available: {', '.join(sorted(presets))}")
    overridden = []
    for dest, value in presets[name].items():
        if not hasattr(args, dest):
            raise ValueError(f"--preset: preset {name!r} sets {dest!r}, which this command has no flag for")
        current = getattr(args, dest)
        if current == parser.get_default(dest):
            setattr(args, dest, value)
        elif current != value:
            overridden.append(dest)
    return (name if not overridden else f"{name}*"), overridden


__all__ = ["NONE", "add_method_args", "apply_preset", "describe", "method_label", "method_settings",
           "methods_from_args", "parse_kv"]
