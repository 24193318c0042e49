"""Host adapter: native transformers 5.x ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP + LLaMA).

The model splices one image's N patch features into N ``image_token_id`` placeholders. Per prefill,
hooks read the placeholders from ``input_ids`` (model pre-hook), capture what methods need from the
model's own CLIP forward (tower hooks: no second tower pass) and, in a decoder pre-hook, hand the
session the visual mask, the [SEG]/guidance positions and the per-image inputs. A pre-LLM reducer's K
merged tokens are projected with the model's projector and written into the first K placeholders of
each image; the other N − K leave the LLM input (``input_keep``), which the engine collapses as if
the prompt had held K placeholders.

Options: ``query_index`` (B,) scoring queries; ``guidance_token_id`` (each row's last occurrence is
the guidance token, e.g. [SEG]) or ``guidance_index`` (B,); ``grid_masks`` (per sample a
``shared.segfirst.GridMasks``: Seg-First); ``sample_keys`` (per sample an image id for random draws).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .base import HostAdapter, register_host


def _is_prefill(past: Any) -> bool:
    if past is None:
        return True
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length()) == 0
    return len(past) == 0


def guidance_positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """(B,) position of the last ``token_id`` in each row of ``ids``; error if a row has none."""
    hit = ids == token_id
    if not bool(hit.any(dim=1).all()):
        rows = (~hit.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"guidance_token_id: token {token_id} is absent from row(s) {rows} of input_ids")
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return torch.where(hit, pos, torch.full_like(pos, -1)).max(dim=1).values


def rows_per_image(rows: int, images: int, what: str) -> int:
    """k such that ``rows`` = k · ``images`` (generate repeats each sample for beams)."""
    if images <= 0 or rows % images != 0:
        raise ValueError(
            f"{what}: {images} image(s) for {rows} prompt row(s); expected one image per sample (each repeated "
            f"for beams as generate does)"
        )
    return rows // images


class NativeHost(HostAdapter):
    """Shared parts of the native transformers hosts: options, decoder, placeholder bookkeeping."""

    options = {"query_index": None, "guidance_index": None, "guidance_token_id": None, "grid_masks": None,
               "sample_keys": None}
    optional = {"guidance_token": "guidance_token_id", "instance_masks": "grid_masks"}
    engine_always = True

    def check_options(self) -> None:
        if self.opts["guidance_index"] is not None and self.opts["guidance_token_id"] is not None:
            raise ValueError("guidance_index/guidance_token_id: give at most one of them")

    def provides(self):
        got = set(super().provides())
        if self.opts["guidance_index"] is not None:
            got.add("guidance_token")
        return frozenset(got)

    def core(self) -> nn.Module:
        core = getattr(self.model, "model", None)
        if core is None or not hasattr(core, "vision_tower") or not hasattr(core, "multi_modal_projector"):
            raise TypeError(
                f"model: expected a transformers 5.x vision-language model with model.vision_tower and "
                f"model.multi_modal_projector, got {type(self.model).__name__}"
            )
        return core

    def decoder(self) -> nn.Module:
        return self.core().language_model

    @property
    def image_token(self) -> int:
        return int(self.model.config.image_token_id)

    # --------------------------------------------------------------- the hooks
    def install(self, session: Any, stack: ExitStack) -> None:
        """A model pre-hook reads each prefill's prompt (``input_ids``), ``capture`` installs what the
        host records from the model's own tower forward, a decoder pre-hook hands the prefill to the
        session (``prefill``, which may replace the decoder's kwargs) and a decoder hook closes it."""
        pending: Dict[str, Any] = {}
        self.capture(session, stack)

        def on_model(_m, args, kwargs):
            got = self._read_prompt(kwargs, args)
            if got is not None:
                self.check_prompt(session, got, kwargs)
                pending.clear()
                pending.update(got)

        def on_decoder(_m, args, kwargs):
            if not pending:
                return None
            prompt = dict(pending)
            pending.clear()
            new_kwargs = self.prefill(session, prompt, kwargs)
            return None if new_kwargs is None else (args, new_kwargs)

        def after_decoder(_m, _args, _kwargs, _out):
            session.finish()

        dec = self.decoder()
        stack.callback(self.model.register_forward_pre_hook(on_model, with_kwargs=True).remove)
        stack.callback(dec.register_forward_pre_hook(on_decoder, with_kwargs=True).remove)
        stack.callback(dec.register_forward_hook(after_decoder, with_kwargs=True).remove)

    def capture(self, session: Any, stack: ExitStack) -> None:
        """Install the tower hooks the session's methods need (default: none)."""

    def check_prompt(self, session: Any, prompt: Dict[str, Any], model_kwargs: Dict[str, Any]) -> None:
        """Refuse a prompt this host cannot lay out, before the model runs (default: accept)."""

    def prefill(self, session: Any, prompt: Dict[str, Any], kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """Report one prefill to the session; return replaced decoder kwargs or None."""
        raise NotImplementedError  # pragma: no cover - interface

    def _read_prompt(self, kwargs: Dict[str, Any], args: tuple) -> Optional[Dict[str, Any]]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not _is_prefill(kwargs.get("past_key_values")):
            return None
        visual = ids == self.image_token
        if not bool(visual.any()):
            raise ValueError(
                f"input_ids: no image placeholder (id {self.image_token}) in the prompt; expand images with the "
                f"model's processor"
            )
        gi = self.opts["guidance_index"]
        if self.opts["guidance_token_id"] is not None:
            gi = guidance_positions(ids, int(self.opts["guidance_token_id"]))
        return {"ids": ids, "visual": visual, "guidance": gi}

    def _image_keys(self, images: int, embeds: torch.Tensor, visual: torch.Tensor, rows: int) -> List[Any]:
        """Per image: the user's ``sample_keys`` entry, else a digest of its visual embeddings."""
        from ..engine.request import digest_key

        keys = self._per_image("sample_keys", images)
        k = rows // images
        return [key if key is not None else "embeds:" + digest_key(embeds[i * k, visual[i * k]]) for i, key in enumerate(keys)]

    def _per_image(self, name: str, images: int) -> List[Any]:
        vals = self.opts[name]
        if vals is None:
            return [None] * images
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        if len(vals) != images:
            raise ValueError(f"{name}: expected one entry per sample ({images}), got {len(vals)}")
        return vals


@register_host
class HFLlavaHost(NativeHost):
    """transformers 5.x ``LlavaForConditionalGeneration`` (CLIP tower with [CLS], one image per sample)."""

    name = "hf_llava"
    always = frozenset({"decoder", "cls_attention", "cls_token", "vision_features", "token_subset", "token_merge"})

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration"

    def capture(self, session: Any, stack: ExitStack) -> None:
        from ..scoring import capture_input, tower_layers

        needs = set().union(*(m.needs() for m in session.methods)) if session.methods else set()
        self._cls_box = self._tower_box = None
        if "cls_attention" in needs:
            self._cls_box = stack.enter_context(capture_input(tower_layers(self.core().vision_tower)[-1].self_attn))
        if session.pre is not None:
            self._tower_box = stack.enter_context(session.pre.capture_during(self.core().vision_tower))

    def prefill(self, session: Any, prompt: Dict[str, Any], kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        from ..scoring import cls_attention, tower_layers

        core, pre, method = self.core(), session.pre, session.method
        ids, visual, gi = prompt["ids"], prompt["visual"], prompt["guidance"]
        rows = ids.shape[0]
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != ids.shape:
            raise RuntimeError("model: the LLaVA decoder did not receive the spliced (B, L, D) inputs_embeds")
        counts = visual.sum(1)
        input_keep, pre_llm, source, new_kwargs = None, None, None, None
        if pre is not None:
            reduced = pre.reduce(self._tower_box.inputs())
            k = rows_per_image(rows, reduced.features.shape[0], "pixel_values")
            proj = core.multi_modal_projector(reduced.features.to(embeds.dtype))  # (images, K, D)
            embeds = embeds.clone()
            input_keep = torch.ones_like(visual)
            pre_llm = []
            for b in range(rows):
                i = b // k
                pos = torch.nonzero(visual[b], as_tuple=False).flatten()
                n_out = int(reduced.counts[i])
                if n_out > pos.numel():
                    raise ValueError(f"pixel_values: the reducer emits {n_out} tokens for {pos.numel()} placeholders")
                embeds[b, pos[:n_out]] = proj[i, :n_out].to(embeds.dtype)
                input_keep[b, pos[n_out:]] = False
                if b % k == 0:
                    pre_llm.append({"tokens": n_out, "indices": reduced.indices[i, :n_out].cpu()})
            source = counts
            new_kwargs = dict(kwargs, inputs_embeds=embeds)
        selection_inputs = None
        if method is not None and method.uses_selection:
            images, scores = rows, None
            if self._cls_box is not None:
                scores = cls_attention(tower_layers(core.vision_tower)[-1].self_attn, self._cls_box.get())
                images = scores.shape[0]
                k = rows_per_image(rows, images, "pixel_values")
                for i, n in enumerate(int(n) for n in counts[::k]):
                    if scores.shape[1] != n:
                        raise ValueError(
                            f"pixel_values: [CLS] attention needs one image per sample whose {scores.shape[1]} "
                            f"patches are the sample's image tokens, sample {i} has {n}"
                        )
            masks = self._per_image("grid_masks", images)
            keys = self._image_keys(images, embeds, visual, rows)
            selection_inputs = [
                {"cls_scores": None if scores is None else scores[i].cpu(), "grid_masks": masks[i], "key": keys[i]}
                for i in range(images)
            ]
        session.prefill(
            visual_mask=visual, attention_mask=kwargs.get("attention_mask"), query_index=self.opts["query_index"],
            guidance_index=gi, sample_keys=self.opts["sample_keys"], input_keep=input_keep,
            selection_inputs=selection_inputs, pre_llm=pre_llm, source_visual=source,
        )
        return new_kwargs


__all__ = ["HFLlavaHost", "NativeHost", "guidance_positions", "rows_per_image"]
