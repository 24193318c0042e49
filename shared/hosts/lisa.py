"""Host adapter: the patched LISA fork (``patches/LISA``; LLaVA-Lightning + SAM on transformers 4.31).

LISA's validation is teacher-forced: one forward over ``prompt + "[SEG].</s>"`` per image, all the
image's expressions batched as right-padded rows (``use_cache=False``). The patch series adds two
annotated calls to ``model/LISA.py`` ``LISAForCausalLM.model_forward``, both no-ops unless a session
(``shared.prune(model, method, host="lisa")``) is active on the model:

- ``seg_offset(self, images_clip)`` replaces the hard-coded ``255`` (= N − 1 for N = 256 image tokens)
  of the ``seg_token_mask``; with a pre-LLM reducer (PruMerge, PruMerge+, VisionZip) it runs the
  reducer on the CLIP tower first, so the offset is the reduced count K − 1.
- ``forward_scope(self, input_ids, images_clip, image_paths=...)`` wraps the inference
  ``super().forward(...)``. Inside it the projector takes the reducer's tokens, and a decoder pre-hook
  reads the spliced sequence (image span and [SEG] of each row) and hands it to the session; the
  engine runs ``LisaModel``'s layers, so ``LlavaLlamaForCausalLM.forward`` needs no change: hidden
  states come back full length (pruned slots zero) and LISA's ``seg_token_mask`` indexing works.

The eval driver opens the session around ``model(**input_dict)`` and reads ``session.last``::

    with shared.prune(model, preset("7b-224/8-64-6-16", clustering="cls"), host="lisa") as session:
        out = model(**input_dict)                       # LISAForCausalLM.forward -> model_forward
    rec = session.last                                    # stats per expression row

Sequence layout (one image per row, ``mm_use_im_start_end``): ``input_ids`` holds one
``IMAGE_TOKEN_INDEX`` (−200) at index s (35 with the llava_v1 template); LLaVA's splice replaces it
by the n image tokens, so the expanded sequence has the image at [s, s + n), the ``input_ids``
index i of any later token moves to i + n − 1, and the 2-D attention mask LISA builds keeps the
right padding at the end.

Options: ``query`` — the scoring query of FastV/PyramidDrop (and of LVLM_CSP with
``seg_query="query"``): ``pre_seg`` (default; the token before [SEG], whose hidden state LISA sends to
SAM), ``seg`` or ``last`` (each row's last valid token, </s>); ``mask_source`` — Seg-First instance
masks, a callable (H, W, 3) uint8 RGB → (M, H, W) (e.g. ``shared.segfirst.YoloMaskSource``), run on
the original image of ``image_paths``; a source with ``wants_image_embeddings`` (``SamMaskSource(...,
shared_encoder=True)``) gets the embeddings LISA's own SAM image encoder computed for this forward
(``get_visual_embs`` runs before the LLM) instead of encoding the image again; ``mask_threshold`` — patch
coverage that puts a patch into an instance's token set.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .base import HostAdapter, register_host, session_of

#: LLaVA's placeholder for the image in ``input_ids`` (``utils.utils.IMAGE_TOKEN_INDEX``).
IMAGE_TOKEN_INDEX = -200

#: Scoring-query rows of the host (see the module docstring).
QUERIES = ("pre_seg", "seg", "last")


# ---------------------------------------------------------------------------------- model parts
def vision_tower(model: nn.Module) -> nn.Module:
    """LISA's ``CLIPVisionTower`` wrapper (``model.get_model().get_vision_tower()``)."""
    inner = model.get_model() if hasattr(model, "get_model") else getattr(model, "model", None)
    tower = inner.get_vision_tower() if inner is not None and hasattr(inner, "get_vision_tower") else None
    if tower is None:
        raise TypeError(f"model: no vision tower found in {type(model).__name__} (expected LISAForCausalLM)")
    return tower


def clip_model(model: nn.Module) -> nn.Module:
    """The HF ``CLIPVisionModel`` inside LISA's tower wrapper (``tower.vision_tower``)."""
    tower = vision_tower(model)
    inner = getattr(tower, "vision_tower", None)
    if not isinstance(inner, nn.Module):
        raise TypeError(
            "model: the vision tower is not loaded (call model.get_model().initialize_vision_modules(config) first)"
        )
    return inner


def decoder(model: nn.Module) -> nn.Module:
    """The LLaMA decoder the engine drives: ``LisaModel`` (``model.get_model()``)."""
    inner = model.get_model() if hasattr(model, "get_model") else getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise TypeError(f"model: no LLaMA decoder (with .layers) found in {type(model).__name__}")
    return inner


def projector(model: nn.Module) -> nn.Module:
    """LISA's ``mm_projector`` (one ``nn.Linear``, applied token by token)."""
    proj = getattr(decoder(model), "mm_projector", None)
    if not isinstance(proj, nn.Module):
        raise TypeError(f"model: {type(model).__name__} has no mm_projector")
    return proj


def _tower_config(model: nn.Module):
    return vision_tower(model).config


def tower_geometry(model: nn.Module) -> tuple:
    """(image_size, patch_size) of the CLIP tower: (224, 14) for clip-vit-large-patch14."""
    cfg = _tower_config(model)
    return int(cfg.image_size), int(cfg.patch_size)


def num_patches(model: nn.Module) -> int:
    """N, the image tokens of the unreduced tower: (image_size // patch_size)² (256 at 224 px, 576 at 336)."""
    tower = vision_tower(model)
    n = getattr(tower, "num_patches", None)
    if isinstance(n, int):
        return n
    size, patch = tower_geometry(model)
    return (size // patch) ** 2


def sam_image_encoder(model: nn.Module) -> nn.Module:
    """LISA's SAM ViT image encoder (``model.get_model().visual_model.image_encoder``), run by
    ``get_visual_embs`` on the 1024-px input before the LLM."""
    inner = model.get_model() if hasattr(model, "get_model") else getattr(model, "model", None)
    enc = getattr(getattr(inner, "visual_model", None), "image_encoder", None)
    if not isinstance(enc, nn.Module):
        raise TypeError(f"model: no SAM image encoder (get_model().visual_model.image_encoder) in {type(model).__name__}")
    return enc


def last_clip_attention(model: nn.Module) -> nn.Module:
    """``self_attn`` of the tower's last encoder layer (its input is ``layer_norm1(hidden_states[-2])``)."""
    from ..scoring import tower_layers

    return tower_layers(clip_model(model))[-1].self_attn


# ------------------------------------------------------------------------------------ positions
def image_starts(input_ids: torch.Tensor) -> torch.Tensor:
    """(B,) index of the single ``IMAGE_TOKEN_INDEX`` in each row of ``input_ids`` (B, L)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a (B, L) tensor, got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    hit = input_ids == IMAGE_TOKEN_INDEX
    per_row = hit.sum(dim=1)
    if not bool((per_row == 1).all()):
        bad = [(b, int(c)) for b, c in enumerate(per_row.tolist()) if c != 1]
        raise ValueError(
            f"input_ids: expected exactly one image placeholder ({IMAGE_TOKEN_INDEX}) per row, got (row, count) {bad}"
        )
    return hit.float().argmax(dim=1)


def seg_positions(input_ids: torch.Tensor, seg_token_idx: int) -> torch.Tensor:
    """(B,) ``input_ids`` index of the last [SEG] (``seg_token_idx``) of each row, −1 where absent."""
    hit = input_ids == int(seg_token_idx)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return torch.where(hit, pos, torch.full_like(pos, -1)).max(dim=1).values


@dataclass
class ExpandedLayout:
    """Positions in the spliced sequence of length ``length`` (one image of n tokens per row).

    visual_spans: per row (start, start + n). seg_index: (B,) [SEG] positions (−1 where absent).
    """

    visual_spans: List[tuple]
    seg_index: torch.Tensor
    length: int
    image_tokens: int


def expanded_layout(input_ids: torch.Tensor, image_tokens: int, seg_token_idx: int) -> ExpandedLayout:
    """Layout of LLaVA's splice of ``input_ids`` (B, L) with ``image_tokens`` image tokens per row:
    image at [s, s + n), any later ``input_ids`` index i at i + n − 1; length L + n − 1."""
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 1:
        raise ValueError(f"image_tokens: expected a positive int, got {image_tokens!r}")
    starts = image_starts(input_ids)
    seg = seg_positions(input_ids, seg_token_idx)
    if bool(((seg >= 0) & (seg < starts)).any()):
        raise ValueError("input_ids: a [SEG] token precedes the image placeholder; LISA puts the image first")
    seg_exp = torch.where(seg >= 0, seg + image_tokens - 1, seg)
    spans = [(int(s), int(s) + image_tokens) for s in starts.tolist()]
    return ExpandedLayout(spans, seg_exp, int(input_ids.shape[1]) + image_tokens - 1, image_tokens)


# ------------------------------------------------------------------------------------ images
def _load_rgb(path: str):
    import numpy as np

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a LISA requirement
        raise ImportError("Seg-First reads the original image with Pillow: pip install Pillow") from e
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------ the host
@dataclass
class _Reduced:
    """Reducer output prepared for one ``images_clip``."""

    key: tuple
    features: torch.Tensor  # (n_images, K, C) pre-projector, tower dtype
    count: int
    record: List[Dict[str, Any]]


def _images_key(images_clip: torch.Tensor) -> tuple:
    return (images_clip.data_ptr(), tuple(images_clip.shape), images_clip.dtype, str(images_clip.device))


@register_host
class LisaHost(HostAdapter):
    name = "lisa"
    always = frozenset({"decoder", "guidance_token", "cls_attention", "cls_token", "vision_features",
                        "token_subset", "token_merge"})
    optional = {"instance_masks": "mask_source"}
    options = {"query": "pre_seg", "mask_source": None, "mask_threshold": 0.5}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LISAForCausalLM"

    def check_options(self) -> None:
        if self.opts["query"] not in QUERIES:
            raise ValueError(f"query: expected one of {', '.join(QUERIES)}, got {self.opts['query']!r}")
        src = self.opts["mask_source"]
        if src is not None and not callable(src):
            raise TypeError(f"mask_source: expected a callable image -> (M, H, W) masks, got {type(src).__name__}")
        t = self.opts["mask_threshold"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ValueError(f"mask_threshold: expected a coverage fraction in (0, 1], got {t!r}")
        self._reduced: Optional[_Reduced] = None
        self._cls_box: Any = None
        self._sam_embeds: Optional[List[tuple]] = None

    def decoder(self) -> nn.Module:
        return decoder(self.model)

    def install(self, session: Any, stack: ExitStack) -> None:
        method = session.method
        if method is not None and "cls_attention" in method.needs():
            from ..scoring import capture_input

            self._cls_box = stack.enter_context(capture_input(last_clip_attention(self.model)))
        stack.callback(setattr, self, "_reduced", None)
        src = self.opts["mask_source"]
        if method is not None and "instance_masks" in method.needs() and getattr(src, "wants_image_embeddings", False):
            self._share_sam_encoder(src, stack)

    def _share_sam_encoder(self, src: Any, stack: ExitStack) -> None:
        """Hand LISA's SAM image embeddings to a shared-encoder mask source: ``model_forward`` runs
        ``get_visual_embs`` (SAM's image encoder, once per image) before the LLM, so a forward hook on the
        encoder holds this forward's embeddings when ``forward_scope`` asks for masks. A pre-hook on the
        model clears them at each call, so a failed forward never leaks its embeddings into the next."""
        from ..segfirst_sam import padded_input_size

        encoder = sam_image_encoder(self.model)
        src.check_encoder(encoder)
        self._sam_embeds = []

        def on_encoder(_module, args, output):
            self._sam_embeds.append((output.detach(), padded_input_size(args[0])))

        def on_model(_module, _args, _kwargs):
            self._sam_embeds.clear()

        stack.callback(encoder.register_forward_hook(on_encoder).remove)
        stack.callback(self.model.register_forward_pre_hook(on_model, with_kwargs=True).remove)
        stack.callback(setattr, self, "_sam_embeds", None)

    # ---------------------------------------------------------------- pre-LLM
    def image_tokens(self, session: Any, images_clip: Optional[torch.Tensor]) -> int:
        """Image tokens each row's sequence holds: N of the tower, or K after the session's reducer (run
        here once per ``images_clip``)."""
        if session.pre is None:
            return num_patches(self.model)
        if not isinstance(images_clip, torch.Tensor) or images_clip.dim() != 4:
            raise ValueError(
                f"images_clip: a pre-LLM reducer needs the (n_images, 3, H, W) CLIP images, got "
                f"{tuple(images_clip.shape) if isinstance(images_clip, torch.Tensor) else type(images_clip).__name__}"
            )
        key = _images_key(images_clip)
        r = self._reduced
        if r is not None and r.key == key:
            return r.count
        reduced = session.pre(clip_model(self.model), images_clip)
        counts = sorted({int(c) for c in reduced.counts.tolist()})
        if len(counts) != 1:
            raise ValueError(
                f"images_clip: the reducer kept {counts} tokens for the {images_clip.shape[0]} images; LISA's "
                f"[SEG] offset needs one count per batch (evaluate one image per batch, as ValDataset does)"
            )
        record = [{"tokens": counts[0], "indices": reduced.indices[i, : counts[0]].cpu()}
                  for i in range(reduced.features.shape[0])]
        self._reduced = _Reduced(key, reduced.features, counts[0], record)
        return counts[0]

    def _seg_first_inputs(self, method: Any, image_paths: Optional[Sequence[str]], n: int) -> Dict[str, Any]:
        """Instance masks of the rows' original image (``mask_source`` on ``image_paths``) on the CLIP grid."""
        from ..segfirst import check_source_output, masks_to_grid

        paths = list(image_paths) if image_paths is not None else []
        if len(paths) != 1:
            raise ValueError(
                f"image_paths: Seg-First needs the one original image the rows share (LISA inference), got {len(paths)} paths"
            )
        size, patch = tower_geometry(self.model)
        image = _load_rgb(paths[0])
        src = self.opts["mask_source"]
        if self._sam_embeds is not None:
            got, self._sam_embeds[:] = list(self._sam_embeds), []
            if len(got) != 1:
                raise ValueError(
                    f"mask_source: the shared-encoder SAM source needs the embeddings of the one image of this forward, "
                    f"but LISA's SAM image encoder ran {len(got)} times since the model was called"
                    + (" (model_forward runs it before the LLM; was the LLM called without it?)" if not got else "")
                )
            src.set_embeddings(*got[0])
        t0 = time.perf_counter()
        masks = check_source_output(src(image), image)  # (M, H, W) at the original size
        seconds = time.perf_counter() - t0
        grid = masks_to_grid(masks, size=size, patch=patch, threshold=self.opts["mask_threshold"])
        if grid.num_tokens != n:
            raise ValueError(
                f"mask_source: the {grid.grid}x{grid.grid} CLIP grid of {size} px / {patch} px patches does not match "
                f"the {n} image tokens of the sequence"
            )
        return {"grid_masks": grid, "mask_seconds": seconds}

    # ---------------------------------------------------------------- forward
    @contextmanager
    def forward(self, session: Any, input_ids: torch.Tensor, images_clip: Optional[torch.Tensor],
                image_paths: Optional[Sequence[str]] = None) -> Iterator[None]:
        """One teacher-forced forward of the rows of ``input_ids`` (see ``forward_scope``)."""
        model, method = self.model, session.method
        seg_id = int(getattr(model, "seg_token_idx"))
        patches = num_patches(model)
        n_img = self.image_tokens(session, images_clip)
        layout = expanded_layout(input_ids, n_img, seg_id)
        uses_seg = method is not None and (self.opts["query"] in ("pre_seg", "seg") or "guidance_token" in method.needs())
        if uses_seg and bool((layout.seg_index < 0).any()):
            rows = (layout.seg_index < 0).nonzero().flatten().tolist()
            raise ValueError(f"input_ids: rows {rows} have no [SEG] token (id {seg_id}); the method's query needs it")
        key = str(image_paths[0]) if image_paths else None
        needs = method.needs() if method is not None else frozenset()
        selects = method is not None and method.uses_selection
        extra: Dict[str, Any] = {}
        mask_seconds = None
        if "instance_masks" in needs:
            extra = self._seg_first_inputs(method, image_paths, n_img)
            mask_seconds = extra.pop("mask_seconds")
        seen: Dict[str, Any] = {}
        with ExitStack() as stack:
            reduced = self._reduced if session.pre is not None else None
            if reduced is not None:
                stack.callback(projector(model).register_forward_pre_hook(_feed(reduced.features, patches),
                                                                          with_kwargs=True).remove)

            def on_decoder(_module, args, kwargs):
                emb, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
                if emb is None or mask is None:
                    raise ValueError(
                        "inputs_embeds/attention_mask: the LISA glue expects the spliced embeddings and the 2-D padding mask"
                    )
                b, length = emb.shape[:2]
                if b != input_ids.shape[0] or length != layout.length:
                    raise ValueError(
                        f"inputs_embeds: expected ({input_ids.shape[0]}, {layout.length}) = input_ids rows and "
                        f"L_ids + {n_img} - 1 positions (one image of {n_img} tokens per row), got ({b}, {length})"
                    )
                seen["mask"] = mask.detach()
                seg = layout.seg_index.to(emb.device)
                query = self.opts["query"]
                qi = None if not uses_seg or query == "last" else (seg - 1 if query == "pre_seg" else seg)
                inputs = None
                if selects:
                    cls_scores = None
                    if self._cls_box is not None:
                        from ..scoring import cls_attention

                        scores = cls_attention(last_clip_attention(model), self._cls_box.get())
                        if scores.shape[1] != n_img or scores.shape[0] not in (1, b):
                            raise ValueError(
                                f"images_clip: [CLS] attention needs the tower run on one image or one per row with "
                                f"{n_img} patches, got [CLS] scores of shape {tuple(scores.shape)}"
                            )
                        cls_scores = [scores[r if scores.shape[0] == b else 0].cpu() for r in range(b)]
                    inputs = [dict(extra, key=key, cls_scores=None if cls_scores is None else cls_scores[r])
                              for r in range(b)]
                session.prefill(
                    visual_spans=layout.visual_spans, attention_mask=mask, query_index=qi,
                    guidance_index=seg if uses_seg else None, sample_keys=[key] * b if key else None,
                    selection_inputs=inputs,
                    pre_llm=None if reduced is None else [reduced.record[0]] * b,
                    source_visual=None if reduced is None else torch.full((b,), patches, dtype=torch.long),
                    host_info={"seg_index": layout.seg_index.cpu(), "image_tokens": n_img, "patches": patches,
                               "instances": None if "grid_masks" not in extra else len(extra["grid_masks"].token_sets),
                               "mask_seconds": mask_seconds},
                )
                return None

            stack.callback(self.decoder().register_forward_pre_hook(on_decoder, with_kwargs=True).remove)
            yield
        if "mask" not in seen:
            raise RuntimeError("model: the decoder did not run inside forward_scope")
        session.finish(attention_mask=seen["mask"])


def _feed(features: torch.Tensor, patches: int):
    """Projector pre-hook that replaces the tower's (rows, N, C) patch features by the reducer's tokens."""

    def on_projector(_m, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != patches:
            raise ValueError(
                f"mm_projector: expected the tower's (rows, {patches}, C) patch features, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        feats = features
        if feats.shape[0] == 1 and x.shape[0] != 1:
            feats = feats.expand(x.shape[0], -1, -1)
        elif feats.shape[0] != x.shape[0]:
            raise ValueError(
                f"images_clip: the reducer ran on {feats.shape[0]} images but the tower on {x.shape[0]} rows; "
                f"expected one shared image or one image per row"
            )
        feats = feats.to(device=x.device, dtype=x.dtype)
        return ((feats,) + tuple(args[1:]), kwargs) if args else ((feats,), {})

    return on_projector


# -------------------------------------------------------------------------------- patch hooks
def seg_offset(model: nn.Module, images_clip: Optional[torch.Tensor] = None) -> int:
    """Replaces LISA's hard-coded 255 in ``seg_token_mask``: image tokens in the sequence − 1.

    With it, ``cat([zeros(B, offset), input_ids[:, 1:] == seg, False])`` marks expanded position
    i_SEG + n − 2, the token before [SEG], as upstream does for n = 256. Without an active session: the
    tower's N − 1 (575 for a 336-px CLIP)."""
    session = session_of(model)
    if session is None:
        return num_patches(model) - 1
    return session.host.image_tokens(session, images_clip) - 1


@contextmanager
def forward_scope(model: nn.Module, input_ids: torch.Tensor, images_clip: Optional[torch.Tensor],
                  image_paths: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Wraps LISA's inference ``super().forward``: a no-op without an active session, else one recorded,
    pruned teacher-forced forward (see ``LisaHost.forward``)."""
    session = session_of(model)
    if session is None:
        yield
        return
    with session.host.forward(session, input_ids, images_clip, image_paths):
        yield


__all__ = [
    "ExpandedLayout",
    "IMAGE_TOKEN_INDEX",
    "LisaHost",
    "QUERIES",
    "clip_model",
    "decoder",
    "expanded_layout",
    "forward_scope",
    "image_starts",
    "last_clip_attention",
    "num_patches",
    "projector",
    "sam_image_encoder",
    "seg_offset",
    "seg_positions",
    "tower_geometry",
    "vision_tower",
]
