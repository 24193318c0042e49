"""One pruning session for every method on every host.

    import shared
    with shared.prune(model, shared.FastV(layer=2, keep=64)) as session:
        out = model.generate(**inputs, max_new_tokens=32)
    session.last.stats.visual            # (B, layers) visual tokens each layer saw
    session.last.efficiency(DIMS["llama-7b"], CONVENTIONS["fastv"])

``prune`` finds the host adapter of ``model`` (``shared.hosts``), checks every method's needs against
what the host provides (refusing with the method, the need and the host named), installs the host's
hooks and the engine, and removes everything on exit, also on error. At most one pre-LLM method
(a reducer or selector: PruMerge, VisionZip, SeGPruner) and one in-LLM method (FastV, PyramidDrop,
LVLM_CSP) can be stacked. Each prefill the session sees becomes a ``ForwardRecord``; results live on
the session, never on module globals or on the method configs.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .accounting import DecoderDims, Efficiency, FlopsConvention, from_stats
from .engine import DecoderRunner, PrefillStats
from .engine.adapters import patched_forward
from .hosts.base import SESSION_ATTR, HostAdapter, host_for
from .needs import method_needs, refuse


@dataclass
class ForwardRecord:
    """One prefill through a session.

    stats: tokens / visual tokens per layer per sample (``PrefillStats``; ``stats.stages`` holds the
    visual positions kept at each stage). ``visual_tokens`` there counts the visual tokens before any
    pre-LLM method, so pruning ratios cover the whole stack.
    pre_llm: per sample, what the pre-LLM method did (``keep``: (V, P) bool for selectors; ``tokens``:
    the tokens it sent per image), or None.
    info: per sample, what a method reported (e.g. Seg-First's instances and fallback).
    host: host-specific facts (e.g. LISA's [SEG] positions).
    """

    stats: PrefillStats
    pre_llm: Optional[List[Dict[str, Any]]] = None
    info: List[Dict[str, Any]] = field(default_factory=list)
    host: Dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.stats.tokens.shape[0])

    def efficiency(self, dims: DecoderDims, convention: FlopsConvention) -> List[Efficiency]:
        """Per-sample accounting (``shared.accounting.from_stats``)."""
        return from_stats(self.stats, dims, convention)


def analytic_stats(visual_mask: torch.Tensor, attention_mask: torch.Tensor, layers: int,
                   source_visual: Optional[torch.Tensor] = None) -> PrefillStats:
    """Stats of an unpruned decoder run (no in-LLM method): every layer sees every valid token."""
    valid = attention_mask.bool()
    tok = valid.sum(1).cpu().long()
    vis = (visual_mask.bool() & valid).sum(1).cpu().long()
    b = tok.shape[0]
    stages = [(0, [torch.nonzero(visual_mask[i] & valid[i], as_tuple=False).flatten().cpu() for i in range(b)])]
    return PrefillStats(
        tokens=tok[:, None].expand(b, layers).clone(),
        visual=vis[:, None].expand(b, layers).clone(),
        sequence_length=tok.clone(),
        visual_tokens=(vis if source_visual is None else source_visual.cpu().long()).clone(),
        stages=stages,
    )


class PruningSession:
    """The methods, the host, the engine and the records of one ``prune`` block."""

    def __init__(self, host: HostAdapter, methods: Sequence[Any]) -> None:
        self.host = host
        self.pre: Any = None
        self.method: Any = None
        for m in methods:
            if m is None:
                continue
            stage = getattr(m, "stage", None)
            if stage == "pre_llm":
                if self.pre is not None:
                    raise ValueError(f"methods: two pre-LLM methods ({self.pre.name}, {m.name}); stack at most one")
                self.pre = m
            elif stage == "llm" and (callable(getattr(m, "make_plan", None)) or callable(getattr(m, "make_runner", None))):
                if self.method is not None:
                    raise ValueError(f"methods: two in-LLM methods ({self.method.name}, {m.name}); stack at most one")
                self.method = m
            else:
                raise TypeError(
                    f"methods: {type(m).__name__} is not a pruning method config (shared.get_method(name, ...))"
                )
        provided = host.provides()
        for m in (self.pre, self.method):
            if m is None:
                continue
            missing = method_needs(m) - provided
            if missing:
                raise refuse(m, host, missing, {n: f"{opt}=" for n, opt in host.optional.items()})
        self.engine: Optional[DecoderRunner] = None
        if self.method is not None or host.engine_always:
            # a method may bring its own decoder runner (same interface as DecoderRunner: prepare,
            # forward, generation, last_stats), e.g. Fast3D's compat mode that masks keys instead of
            # dropping tokens
            make_runner = getattr(self.method, "make_runner", None)
            if callable(make_runner):
                self.engine = make_runner(host.decoder())
            else:
                self.engine = DecoderRunner(host.decoder(), self.method)
        self.records: List[ForwardRecord] = []
        self._pending: Optional[Dict[str, Any]] = None
        self._in_generation = False
        self._generation_recorded = False

    # ------------------------------------------------------------------ results
    @property
    def last(self) -> Optional[ForwardRecord]:
        return self.records[-1] if self.records else None

    @property
    def methods(self) -> List[Any]:
        return [m for m in (self.pre, self.method) if m is not None]

    # ------------------------------------------------------------ host callbacks
    def host_selection(self, counts: Sequence[int], inputs: Sequence[Dict[str, Any]]):
        """The in-LLM method's own pre-LLM selection (LVLM_CSP's clustering stage) from per-sample host
        inputs (``cls_scores``, ``grid_masks``, ``key``). Returns (selection or None, per-sample info)."""
        fn = getattr(self.method, "host_selection", None)
        if not callable(fn):
            return None, [{} for _ in counts]
        import inspect

        params = inspect.signature(fn).parameters
        takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        # a host offers every input it has; each method takes the ones it names
        picks = [fn(int(n), **{k: v for k, v in dict(inp).items() if takes_all or k in params})
                 for n, inp in zip(counts, inputs)]
        if all(p is None for p in picks):
            return None, [{} for _ in counts]
        if any(p is None for p in picks):
            raise RuntimeError("internal: a host selection was made for some samples only")
        return [torch.as_tensor(p[0]).long() for p in picks], [dict(p[1]) for p in picks]

    def prefill(
        self,
        *,
        visual_mask: Optional[torch.Tensor] = None,
        visual_spans: Optional[Sequence[Any]] = None,
        attention_mask: Optional[torch.Tensor] = None,
        query_index: Any = None,
        guidance_index: Any = None,
        sample_keys: Optional[Sequence[Any]] = None,
        input_keep: Optional[torch.Tensor] = None,
        selection_inputs: Optional[Sequence[Dict[str, Any]]] = None,
        pre_llm: Optional[List[Dict[str, Any]]] = None,
        source_visual: Optional[torch.Tensor] = None,
        host_info: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Called by the host once per prefill, before its decoder runs. Per-sample entries may be given
        per sample of ``generate``'s batch (beam copies are expanded by the engine)."""
        selection, info = None, None
        if self.method is not None and selection_inputs is not None and self.method.uses_selection:
            if visual_mask is not None:
                counts = [int(n) for n in (visual_mask & (input_keep if input_keep is not None else visual_mask)).sum(1)]
                k = max(1, visual_mask.shape[0] // max(1, len(selection_inputs)))
                counts = counts[::k]
            else:
                counts = [0 if s is None else int(s[1]) - int(s[0]) for s in visual_spans]
            selection, info = self.host_selection(counts, selection_inputs)
            rows = visual_mask.shape[0] if visual_mask is not None else len(visual_spans)
            if selection is not None and len(selection) != rows:  # images were encoded before beam copies
                k = rows // len(selection)
                selection = [s for s in selection for _ in range(k)]
                info = [i for i in info for _ in range(k)]
        if self.engine is not None:
            self.engine.prepare(
                visual_mask=visual_mask, visual_spans=visual_spans, query_index=query_index,
                guidance_index=guidance_index, visual_selection=selection, input_keep=input_keep,
                sample_keys=sample_keys,
            )
        if self._in_generation and self._generation_recorded:
            return  # a cache-less generation step replays the first prefill's decision: no new record
        self._pending = dict(
            visual_mask=visual_mask, visual_spans=visual_spans, attention_mask=attention_mask, pre_llm=pre_llm,
            info=info, source_visual=source_visual, host_info=dict(host_info or {}),
        )

    def finish(self, attention_mask: Optional[torch.Tensor] = None, length: Optional[int] = None) -> Optional[ForwardRecord]:
        """Called by the host after its decoder ran a prefill: turn the pending prefill into a record."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if self.engine is not None:
            stats = self.engine.last_stats
        else:
            mask = attention_mask if attention_mask is not None else pending["attention_mask"]
            vm = pending["visual_mask"]
            if vm is None:
                vm = torch.zeros_like(mask, dtype=torch.bool)
                for b, span in enumerate(pending["visual_spans"]):
                    if span is not None:
                        vm[b, int(span[0]):int(span[1])] = True
            stats = analytic_stats(vm, mask, len(self.host.decoder().layers))
        if pending["source_visual"] is not None:
            src = torch.as_tensor(pending["source_visual"]).long().reshape(-1)
            if src.numel() != stats.visual_tokens.numel():
                k = stats.visual_tokens.numel() // max(1, src.numel())
                src = src.repeat_interleave(k)
            stats.visual_tokens = src.cpu()
        info = pending["info"] or [{} for _ in range(stats.tokens.shape[0])]
        rec = ForwardRecord(stats=stats, pre_llm=pending["pre_llm"], info=info, host=pending["host_info"])
        self.records.append(rec)
        if self._in_generation:
            self._generation_recorded = True
        return rec

    # ------------------------------------------------------------------- scopes
    @contextmanager
    def generation(self) -> Iterator[None]:
        """One generate call: cache-less steps after the first prefill replay its decision."""
        self._in_generation, self._generation_recorded = True, False
        try:
            if self.engine is not None:
                with self.engine.generation():
                    yield
            else:
                yield
        finally:
            self._in_generation = False
            self._pending = None

    def decoder_forward(self, stock_forward: Any, *args: Any, **kwargs: Any):
        """For hosts whose patch series routes the decoder's ``forward`` here: the engine when the session
        has one, else the stock forward with the arguments unchanged."""
        if self.engine is None:
            return stock_forward(*args, **kwargs)
        return self.engine.forward(*args, **kwargs)

    def install(self, stack: ExitStack) -> None:
        for module in self.host.attach_points():
            if SESSION_ATTR in module.__dict__:
                raise RuntimeError(f"model: a pruning session is already active on {type(module).__name__}")
            module.__dict__[SESSION_ATTR] = self
            stack.callback(module.__dict__.pop, SESSION_ATTR, None)
        if self.engine is not None and not self.host.decoder_patched:
            stack.enter_context(patched_forward(self.host.decoder(), self.engine.forward))
        self.host.install(self, stack)
        top = self.host.top_model()
        gen = getattr(top, "generate", None)
        if callable(gen):
            def generate(*args: Any, **kwargs: Any):
                with self.generation():
                    return gen(*args, **kwargs)

            stack.enter_context(_instance_attr(top, "generate", generate))


@contextmanager
def _instance_attr(module: nn.Module, name: str, value: Any) -> Iterator[None]:
    if name == "forward":
        with patched_forward(module, value):
            yield
        return
    had = name in module.__dict__
    old = module.__dict__.get(name)
    module.__dict__[name] = value
    try:
        yield
    finally:
        if had:
            module.__dict__[name] = old
        else:
            module.__dict__.pop(name, None)


@contextmanager
def prune(model: nn.Module, *methods: Any, host: Optional[str] = None, **options: Any) -> Iterator[PruningSession]:
    """Prune ``model`` with ``methods`` (one pre-LLM and/or one in-LLM method config) for the block.

    host: the host adapter's name (default: the one that recognises ``model``; see
    ``shared.hosts.host_names()``). options: the host's options (e.g. ``views=`` for SeGPruner's
    geometry, ``guidance_token_id=`` for LVLM_CSP's [SEG], ``grid_masks=`` for Seg-First).
    """
    adapter = host_for(model, host, **options)
    session = PruningSession(adapter, methods)
    with ExitStack() as stack:
        session.install(stack)
        yield session


__all__ = ["ForwardRecord", "PruningSession", "analytic_stats", "prune"]
