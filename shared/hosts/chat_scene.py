"""Host adapter: Chat-Scene (``patches/Chat-Scene``; Vicuna-7B with 100 object slots × 3 tokens).

The patch series adds two annotated calls into this module, each a no-op unless a session
(``shared.prune(model, method, host="chat_scene")``) is active on the ``Chat3D`` model:

- **P1** ``llama_forward``: the vendored ``models/modeling_llama.py::LlamaModel.forward`` routes to the
  session's engine while an in-LLM method is active, and to its own (renamed) loop otherwise.
- **P2** ``publish_objects``: ``Chat3D.evaluate``, once per sample right before its ``generate``,
  hands the session the object-token layout of ``wrapped_embed = [p_0, objects, p_1, prompt]``:
  the visual span ``[len(p_0), len(p_0) + n·group)``, the group size (identifier + 3D + 2D feature
  = 3 with Chat-Scene's eval config), the slot → object map (``assigned_ids``) and the GAP inputs
  (raw prompt in object-id space, per-object features and boxes). ``generate`` then runs the
  sample on ``num_beams`` copies; the engine expands the per-sample description to every beam.

Options: ``object_scores`` (per-object scores given per sample: a mapping sample key → (n,) tensor,
or a callable ``key -> tensor``; e.g. GAP predictions from a file), ``sample_keys`` (a callable
``(batch_kwargs, i) -> key``; default ``"{scene_id}|{qid}|{sha1(prompt)[:16]}"``).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from .base import HostAdapter, register_host, session_of


def default_key(batch: Mapping[str, Any], i: int, prompt: str) -> str:
    """A per-sample key from Chat-Scene's eval batch: ``"{scene_id}|{qid}|{sha1(prompt)[:16]}"``
    (``evaluate`` does not pass ``obj_ids`` on; eval drivers give their own keys via ``sample_keys``)."""
    import hashlib

    scene = batch.get("scene_id")
    qid = batch.get("qid")
    if scene is None:
        raise ValueError("sample_keys: the batch has no scene_id; pass sample_keys=callable(batch, i) -> key")
    q = qid[i] if qid is not None else 0
    return f"{scene[i]}|{q}|{hashlib.sha1(prompt.encode()).hexdigest()[:16]}"


def inner_llama(model: nn.Module) -> nn.Module:
    """The ``LlamaModel`` inside Chat3D's ``llama_model`` (with or without the peft LoRA wrapper)."""
    lm = getattr(model, "llama_model", None)
    if lm is None:
        raise TypeError(f"model: expected Chat-Scene's Chat3D (with .llama_model), got {type(model).__name__}")
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"model: {type(base).__name__} has no decoder (.model.layers)")
    return inner


@register_host
class ChatSceneHost(HostAdapter):
    name = "chat_scene"
    always = frozenset({"decoder", "object_groups"})
    options = {"object_scores": None, "sample_keys": None}
    decoder_patched = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "Chat3D"

    def check_options(self) -> None:
        scores = self.opts["object_scores"]
        if scores is not None and not (callable(scores) or isinstance(scores, Mapping)):
            raise ValueError(
                f"object_scores: expected a mapping sample key -> (n,) scores or a callable key -> scores, "
                f"got {type(scores).__name__}"
            )
        keys = self.opts["sample_keys"]
        if keys is not None and not callable(keys):
            raise ValueError(f"sample_keys: expected a callable (batch, i) -> key, got {type(keys).__name__}")

    def decoder(self) -> nn.Module:
        return inner_llama(self.model)

    def attach_points(self) -> List[nn.Module]:
        return [self.model, self.decoder()]

    def top_model(self) -> nn.Module:
        return self.model.llama_model

    def install(self, session: Any, stack: ExitStack) -> None:
        def after_decoder(_m, _args, _kwargs, _out):
            session.finish()

        stack.callback(self.decoder().register_forward_hook(after_decoder, with_kwargs=True).remove)

    def scores_for(self, key: str) -> Optional[torch.Tensor]:
        given = self.opts["object_scores"]
        if given is None:
            return None
        if callable(given):
            out = given(key)
        else:
            if key not in given:
                raise KeyError(f"object_scores: no scores for sample {key!r} ({len(given)} samples given)")
            out = given[key]
        return torch.as_tensor(out)


# --------------------------------------------------------------------------------------- P1
def llama_forward(decoder: nn.Module, stock_forward: Callable, *args: Any, **kwargs: Any):
    """[P1] The vendored ``LlamaModel.forward``: the session's engine while an in-LLM method is active,
    else ``stock_forward`` (the vendored loop) with the arguments unchanged."""
    session = session_of(decoder)
    if session is None or session.engine is None:
        return stock_forward(*args, **kwargs)
    if kwargs.pop("customized_mask", None) is not None:
        raise ValueError(
            "customized_mask: Chat-Scene's bidirectional object attention (model.bidirection=True) cannot be "
            "combined with token pruning; evaluate with bidirection=False (the released eval config)"
        )
    return session.decoder_forward(stock_forward, *args, **kwargs)


# --------------------------------------------------------------------------------------- P2
def publish_objects(
    model: nn.Module,
    i: int,
    wrapped_embed: torch.Tensor,
    vis_start: int,
    vis_len: int,
    assigned_ids: torch.Tensor,
    obj_feats: torch.Tensor,
    obj_img_feats: Optional[torch.Tensor],
    locs: torch.Tensor,
    prompt: str,
    batch: Mapping[str, Any],
) -> None:
    """[P2] Describe sample ``i``'s prefill to the session (no-op without one).

    wrapped_embed: (1, L, d) the sample's LLM input; vis_start: ``p_0_embed.shape[1]``; vis_len: ``object_list_embed.shape[1]`` (n slots × group);
    assigned_ids: (n,) object id carried by each slot; obj_feats/obj_img_feats: (n_obj, 1024) raw
    3D/2D object features; locs: (n_obj', 6) boxes; prompt: the raw prompt (object-id space);
    batch: ``evaluate``'s keyword arguments (for the sample key)."""
    session = session_of(model)
    if session is None:
        return
    host = session.host
    slots = int(assigned_ids.shape[0])
    if slots == 0 or vis_len % slots:
        raise ValueError(f"vis_len: {vis_len} object tokens are not whole groups over {slots} object slots")
    group = vis_len // slots
    key = str(host.opts["sample_keys"](batch, i)) if host.opts["sample_keys"] else default_key(batch, i, prompt)
    inputs: Dict[str, Any] = {
        "group": group,
        "slot_to_object": assigned_ids.detach().cpu().long(),
        # looked up only for a method that selects from them (Fast3D), so a partial mapping never fails FastV
        "object_scores": host.scores_for(key) if getattr(session.method, "uses_selection", False) else None,
        "gap_inputs": {"prompt": prompt, "obj_feats": obj_feats, "obj_img_feats": obj_img_feats, "locs": locs},
        "key": key,
    }
    session.prefill(
        visual_spans=[(int(vis_start), int(vis_start) + int(vis_len))],
        attention_mask=torch.ones(1, int(wrapped_embed.shape[1]), dtype=torch.bool),
        selection_inputs=[inputs],
        sample_keys=[key],
        host_info={"key": key, "vis_start": int(vis_start), "objects": slots, "group": group},
    )


__all__ = ["ChatSceneHost", "default_key", "inner_llama", "llama_forward", "publish_objects"]
