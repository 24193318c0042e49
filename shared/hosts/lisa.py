"""Glue for the patched LISA fork (``patches/LISA``; LLaVA-Lightning + SAM on transformers 4.31).

LISA's validation is teacher-forced: one forward over ``prompt + "[SEG].</s>"`` per image, all the
image's expressions batched as right-padded rows (``use_cache=False``). The patch series adds two
annotated calls to ``model/LISA.py`` ``LISAForCausalLM.model_forward`` and nothing else:

- ``seg_offset(self, images_clip, kwargs.get("pruner"))`` replaces the hard-coded ``255`` (= N − 1
  for N = 256 image tokens) of the ``seg_token_mask``; with a pre-LLM reducer (PruMerge, PruMerge+,
  VisionZip) it runs the reducer first, so the offset is the reduced count K − 1.
- ``pruning_context(self, input_ids, images_clip, kwargs.get("pruner"), image_paths=...)`` wraps the
  inference ``super().forward(...)``. Inside it the engine replaces ``LisaModel.forward`` (the
  LlamaModel decoder), so ``LlavaLlamaForCausalLM.forward`` needs no change: the hidden states come
  back full length (pruned slots zero) and LISA's ``seg_token_mask`` indexing works unchanged.

The eval driver passes the configuration through LISA's ``**kwargs`` as ``pruner=LisaPruner(...)``
and reads the per-forward accounting from ``pruner.records`` afterwards::

    pruner = LisaPruner(method=preset("7b-224/8-64-6-16", clustering="cls"))
    out = model(**input_dict, pruner=pruner)        # LISAForCausalLM.forward -> model_forward
    rec = pruner.records[-1]                         # stats per expression row

Sequence layout (one image per row, ``mm_use_im_start_end``): ``input_ids`` holds one
``IMAGE_TOKEN_INDEX`` (−200) at index s (35 with the llava_v1 template); LLaVA's splice replaces it
by the n image tokens, so the expanded sequence has the image at [s, s + n), the ``input_ids``
index i of any later token moves to i + n − 1, and the 2-D attention mask LISA builds keeps the
right padding at the end.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..engine import DecoderRunner, PrefillStats, pruning

#: LLaVA's placeholder for the image in ``input_ids`` (``utils.utils.IMAGE_TOKEN_INDEX``).
IMAGE_TOKEN_INDEX = -200

#: Scoring-query rows for FastV and PyramidDrop (LVLM_CSP ranks with [SEG] itself, or the row
#: before it with the method's ``seg_query="pre_seg"``):
#: ``pre_seg`` the token before [SEG] (ASSISTANT's ":", the last prompt token, whose hidden state
#: LISA sends to SAM), ``seg`` the [SEG] token itself, ``last`` each row's last valid token (</s>).
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


def last_clip_attention(model: nn.Module) -> nn.Module:
    """``self_attn`` of the tower's last encoder layer (its input is ``layer_norm1(hidden_states[-2])``)."""
    from ..scoring import tower_layers

    return tower_layers(clip_model(model))[-1].self_attn


# --------------------------------------------------------------------------------- configuration
@dataclass
class LisaRecord:
    """Accounting of one patched forward (one image, B expression rows).

    stats: the engine's ``PrefillStats`` ((B, layers) tokens / visual tokens per layer; built from
    the layout when no in-LLM method ran). image_tokens: n, the image tokens spliced into each row
    (N, or K after a reducer). patches: N of the tower. seg_index: (B,) expanded index of each row's
    [SEG] (−1 where absent). selection: per row the sorted indices (into the n image tokens) of
    LVLM_CSP's clustering stage, or None. info: method details (Seg-First: instances, quotas,
    fallback_used).
    """

    stats: PrefillStats
    image_tokens: int
    patches: int
    seg_index: torch.Tensor
    selection: Optional[List[torch.Tensor]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> Optional[List[int]]:
        """|S| per row (LVLM_CSP's clustering stage), or None."""
        return None if self.selection is None else [int(s.numel()) for s in self.selection]

    @property
    def text_tokens(self) -> List[int]:
        """Valid non-image tokens per row (N_sys + N_usr + N_out)."""
        return [int(t) - self.image_tokens for t in self.stats.sequence_length]


@dataclass
class LisaPruner:
    """What LISA's ``model_forward`` receives as ``kwargs["pruner"]``.

    method: in-LLM method config (``LVLMCSP``, ``FastV``, ``PyramidDrop``) or None.
    reducer: pre-LLM reducer (``PruMerge``, ``PruMergePlus``, ``VisionZip``) or None; not both.
    mask_source: Seg-First instance masks, callable (H, W, 3) uint8 RGB → (M, H, W) (e.g.
        ``shared.segfirst.YoloMaskSource``); required for LVLM_CSP ``clustering="seg_first"``.
    query: scoring query of FastV/PyramidDrop, one of ``QUERIES`` (default ``pre_seg``); LVLM_CSP
        ranks with the guidance token [SEG] and its own ``seg_query``, so ``query`` must stay default.
    mask_threshold: patch coverage that puts a patch into an instance's token set (Seg-First).
    records: one ``LisaRecord`` appended per forward.
    """

    method: Any = None
    reducer: Any = None
    mask_source: Any = None
    query: str = "pre_seg"
    mask_threshold: float = 0.5
    records: List[LisaRecord] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.method is not None and not callable(getattr(self.method, "make_plan", None)):
            raise TypeError(
                f"method: expected an in-LLM method config with make_plan (LVLMCSP, FastV, PyramidDrop), "
                f"got {type(self.method).__name__}"
            )
        if self.reducer is not None and not (
            callable(getattr(self.reducer, "capture", None)) and callable(getattr(self.reducer, "reduce", None))
        ):
            raise TypeError(
                f"reducer: expected a pre-LLM reducer with capture/reduce (PruMerge, PruMergePlus, VisionZip), "
                f"got {type(self.reducer).__name__}"
            )
        if self.method is not None and self.reducer is not None:
            raise ValueError("method/reducer: give an in-LLM method or a pre-LLM reducer, not both")
        if self.query not in QUERIES:
            raise ValueError(f"query: expected one of {', '.join(QUERIES)}, got {self.query!r}")
        if self.query != "pre_seg" and hasattr(self.method, "seg_query"):
            raise ValueError(
                "query: LVLM_CSP ranks with the [SEG] token (or the row before it); choose that with the "
                "method's seg_query='seg'|'pre_seg', not with LisaPruner.query"
            )
        if self.mask_source is not None and not callable(self.mask_source):
            raise TypeError(f"mask_source: expected a callable image -> (M, H, W) masks, got {type(self.mask_source).__name__}")
        t = self.mask_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0:
            raise ValueError(f"mask_threshold: expected a coverage fraction in (0, 1], got {t!r}")
        if self.clustering == "seg_first" and self.mask_source is None:
            raise ValueError("mask_source: LVLM_CSP clustering='seg_first' needs an instance-mask source")
        self._reduced: Optional[_Reduced] = None

    @property
    def clustering(self) -> Optional[str]:
        """LVLM_CSP's clustering mode when its clustering stage runs (``cluster_layers > 0``), else None."""
        m = self.method
        mode = getattr(m, "clustering", None)
        if mode is not None and callable(getattr(m, "cluster", None)) and getattr(m, "cluster_layers", 0) > 0:
            return mode
        return None

    @property
    def last(self) -> Optional[LisaRecord]:
        return self.records[-1] if self.records else None


@dataclass
class _Reduced:
    """Reducer output prepared for one ``images_clip`` of one model."""

    model_id: int
    key: tuple
    features: torch.Tensor  # (n_images, K, C) pre-projector, tower dtype
    count: int


def _images_key(images_clip: torch.Tensor) -> tuple:
    return (images_clip.data_ptr(), tuple(images_clip.shape), images_clip.dtype, str(images_clip.device))


def _as_pruner(method: Any, mask_source: Any, query: Optional[str]) -> Optional[LisaPruner]:
    if method is None:
        if mask_source is not None or query is not None:
            raise ValueError("mask_source/query: given without a method")
        return None
    if isinstance(method, LisaPruner):
        if mask_source is not None or query is not None:
            raise ValueError("mask_source/query: already set on the LisaPruner; do not pass them again")
        return method
    if callable(getattr(method, "capture", None)) and callable(getattr(method, "reduce", None)):
        return LisaPruner(reducer=method)
    return LisaPruner(method=method, mask_source=mask_source, query=query or "pre_seg")


# ------------------------------------------------------------------------------ pre-LLM reducers
def prepare_reducer(model: nn.Module, images_clip: torch.Tensor, pruner: LisaPruner) -> int:
    """Run ``pruner.reducer`` on the CLIP tower for ``images_clip`` (n_images, 3, H, W) once and keep
    the reduced pre-projector tokens for the projector hook of ``pruning_context``. Returns K, the
    tokens per image (they must be equal across the images: LISA's offset is one number)."""
    if not isinstance(images_clip, torch.Tensor) or images_clip.dim() != 4:
        raise ValueError(
            f"images_clip: expected a (n_images, 3, H, W) tensor, got "
            f"{tuple(images_clip.shape) if isinstance(images_clip, torch.Tensor) else type(images_clip).__name__}"
        )
    key = _images_key(images_clip)
    r = pruner._reduced
    if r is not None and r.model_id == id(model) and r.key == key:
        return r.count
    reduced = pruner.reducer(clip_model(model), images_clip)
    counts = sorted({int(c) for c in reduced.counts.tolist()})
    if len(counts) != 1:
        raise ValueError(
            f"images_clip: the reducer kept {counts} tokens for the {images_clip.shape[0]} images; LISA's "
            f"[SEG] offset needs one count per batch (evaluate one image per batch, as ValDataset does)"
        )
    pruner._reduced = _Reduced(id(model), key, reduced.features, counts[0])
    return counts[0]


def image_token_count(model: nn.Module, images_clip: Optional[torch.Tensor] = None, pruner: Any = None) -> int:
    """Image tokens each row's sequence holds: N of the tower, or K after ``pruner``'s reducer
    (which this call runs on ``images_clip`` if it has not run for them yet)."""
    if isinstance(pruner, LisaPruner) and pruner.reducer is not None:
        if images_clip is None:
            raise ValueError("images_clip: a pre-LLM reducer needs the CLIP images to count its tokens")
        return prepare_reducer(model, images_clip, pruner)
    if pruner is not None and not isinstance(pruner, LisaPruner):
        return image_token_count(model, images_clip, _as_pruner(pruner, None, None))
    return num_patches(model)


def seg_offset(model: nn.Module, images_clip: Optional[torch.Tensor] = None, pruner: Any = None) -> int:
    """Replaces LISA's hard-coded 255 in ``seg_token_mask``: image tokens in the sequence − 1.

    With it, ``cat([zeros(B, offset), input_ids[:, 1:] == seg, False])`` marks expanded position
    i_SEG + n − 2, the token before [SEG], as upstream does for n = 256."""
    return image_token_count(model, images_clip, pruner) - 1


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


# ------------------------------------------------------------------------------------ selection
def _load_rgb(path: str):
    import numpy as np

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a LISA requirement
        raise ImportError("Seg-First reads the original image with Pillow: pip install Pillow") from e
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def seg_first_selection(model: nn.Module, pruner: LisaPruner, image_path: str, visual_tokens: int):
    """LVLM_CSP Seg-First selection for one image: instance masks of the ORIGINAL image at
    ``image_path`` → CLIP grid (the tower's image/patch size) → ``method.cluster``. Returns
    (indices (|S|,), info dict with ``instances`` and the method's info)."""
    from ..segfirst import check_source_output, masks_to_grid

    size, patch = tower_geometry(model)
    image = _load_rgb(image_path)
    masks = check_source_output(pruner.mask_source(image), image)  # (M, H, W) at the original image size
    grid = masks_to_grid(masks, size=size, patch=patch, threshold=pruner.mask_threshold)
    if grid.num_tokens != visual_tokens:
        raise ValueError(
            f"mask_source: the {grid.grid}x{grid.grid} CLIP grid of {size} px / {patch} px patches does not match the "
            f"{visual_tokens} image tokens of the sequence"
        )
    idx, info = pruner.method.cluster(visual_tokens, grid_masks=grid)
    info = dict(info)
    info["instances"] = int(len(grid.token_sets))
    return torch.as_tensor(idx).long(), info


def _analytic_stats(attention_mask: torch.Tensor, image_tokens: int, layers: int) -> PrefillStats:
    valid = attention_mask.bool().sum(dim=1).cpu().long()
    b = valid.shape[0]
    return PrefillStats(
        tokens=valid[:, None].expand(b, layers).clone(),
        visual=torch.full((b, layers), image_tokens, dtype=torch.long),
        sequence_length=valid.clone(),
        visual_tokens=torch.full((b,), image_tokens, dtype=torch.long),
    )


# ------------------------------------------------------------------------------------ the context
class LisaSession:
    """State of one ``pruning_context`` block (one patched forward)."""

    def __init__(self, model: nn.Module, pruner: LisaPruner, engine: Optional[DecoderRunner]) -> None:
        self.model = model
        self.pruner = pruner
        self.engine = engine
        self.layout: Optional[ExpandedLayout] = None
        self.attention_mask: Optional[torch.Tensor] = None
        self.selection: Optional[List[torch.Tensor]] = None
        self.info: Dict[str, Any] = {}
        self.record: Optional[LisaRecord] = None


@contextmanager
def pruning_context(
    model: nn.Module,
    input_ids: torch.Tensor,
    images_clip: Optional[torch.Tensor],
    method: Any,
    image_paths: Optional[Sequence[str]] = None,
    mask_source: Any = None,
    query: Optional[str] = None,
    seg_token_idx: Optional[int] = None,
) -> Iterator[Optional[LisaSession]]:
    """Run LISA's inference ``super().forward`` of ``model`` (``LISAForCausalLM``) under ``method``.

    input_ids: (B, L) the rows' token ids with one ``IMAGE_TOKEN_INDEX`` each (right padded).
    images_clip: (n_images, 3, H, W) CLIP inputs (LISA inference: one image shared by all rows).
    method: a ``LisaPruner``, an in-LLM method config (``LVLMCSP``/``FastV``/``PyramidDrop``), a
        pre-LLM reducer, or None (no-op: yields None and installs nothing).
    image_paths: the batch's original image paths (Seg-First reads the image from disk).
    mask_source / query: see ``LisaPruner`` (only with a bare method config).
    seg_token_idx: id of [SEG] (default ``model.seg_token_idx``).

    Installs, for the block only: the engine on ``model.get_model()`` (in-LLM methods); a hook on the
    last CLIP layer's ``self_attn`` (LVLM_CSP ``cls``); a pre-hook on ``mm_projector`` that feeds it
    the reducer's tokens (pre-LLM reducers); and a decoder pre-hook that checks the spliced sequence
    against ``input_ids``, computes the clustering selection and calls ``engine.prepare``. On a normal
    exit a ``LisaRecord`` is appended to ``pruner.records`` (and set on the yielded session).
    """
    pruner = _as_pruner(method, mask_source, query)
    if pruner is None:
        yield None
        return
    seg_id = int(seg_token_idx if seg_token_idx is not None else getattr(model, "seg_token_idx"))
    dec = decoder(model)
    patches = num_patches(model)
    needs_seg = pruner.method is not None and (
        pruner.query in ("pre_seg", "seg") or getattr(pruner.method, "clustering", None) is not None
    )
    with ExitStack() as stack:
        stack.callback(setattr, pruner, "_reduced", None)  # a reducer's tokens serve this forward only
        engine = stack.enter_context(pruning(dec, pruner.method)) if pruner.method is not None else None
        session = LisaSession(model, pruner, engine)
        mode = pruner.clustering
        cls_box = None
        if mode == "cls":
            from ..scoring import capture_input

            cls_box = stack.enter_context(capture_input(last_clip_attention(model)))
        fixed_selection = None
        if mode == "seg_first":
            paths = list(image_paths) if image_paths is not None else []
            if len(paths) != 1:
                raise ValueError(
                    f"image_paths: Seg-First needs the one original image the rows share (LISA inference), got {len(paths)} paths"
                )
            idx, info = seg_first_selection(model, pruner, paths[0], patches)
            fixed_selection = idx
            session.info.update(info)

        n_img = patches
        if pruner.reducer is not None:
            if images_clip is None:
                raise ValueError("images_clip: a pre-LLM reducer needs the CLIP images")
            n_img = prepare_reducer(model, images_clip, pruner)
            reduced = pruner._reduced

            def on_projector(_m, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != patches:
                    raise ValueError(
                        f"mm_projector: expected the tower's (rows, {patches}, C) patch features, got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                    )
                feats = reduced.features
                if feats.shape[0] == 1 and x.shape[0] != 1:
                    feats = feats.expand(x.shape[0], -1, -1)
                elif feats.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"images_clip: the reducer ran on {feats.shape[0]} images but the tower on {x.shape[0]} rows; "
                        f"expected one shared image or one image per row"
                    )
                feats = feats.to(device=x.device, dtype=x.dtype)
                return ((feats,) + tuple(args[1:]), kwargs) if args else ((feats,), {})

            stack.callback(projector(model).register_forward_pre_hook(on_projector, with_kwargs=True).remove)
        layout = expanded_layout(input_ids, n_img, seg_id)
        session.layout = layout
        if needs_seg and bool((layout.seg_index < 0).any()):
            rows = (layout.seg_index < 0).nonzero().flatten().tolist()
            raise ValueError(f"input_ids: rows {rows} have no [SEG] token (id {seg_id}); the method's query needs it")

        def on_decoder(_module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            mask = kwargs.get("attention_mask")
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
            session.attention_mask = mask.detach()
            if engine is None:
                return None
            gi = layout.seg_index.to(emb.device) if needs_seg else None
            if pruner.query == "pre_seg":
                qi = gi - 1
            elif pruner.query == "seg":
                qi = gi
            else:
                qi = None
            selection = None
            if mode == "cls":
                from ..scoring import cls_attention

                hidden = cls_box.get()
                scores = cls_attention(last_clip_attention(model), hidden)
                if scores.shape[1] != n_img or scores.shape[0] not in (1, b):
                    raise ValueError(
                        f"images_clip: clustering='cls' needs the tower run on one image or one per row with "
                        f"{n_img} patches, got [CLS] scores of shape {tuple(scores.shape)}"
                    )
                selection = [
                    pruner.method.cluster(n_img, cls_scores=scores[r if scores.shape[0] == b else 0].cpu())[0]
                    for r in range(b)
                ]
            elif mode == "seg_first":
                selection = [fixed_selection] * b
            elif mode is not None:  # random / uniform: the method's own rule, recorded here
                selection = [pruner.method.cluster(n_img)[0]] * b
            if selection is not None:
                selection = [torch.as_tensor(s).long().cpu() for s in selection]
                session.selection = selection
            engine.prepare(
                visual_spans=layout.visual_spans, query_index=qi, guidance_index=gi, visual_selection=selection
            )
            return None

        stack.callback(dec.register_forward_pre_hook(on_decoder, with_kwargs=True).remove)
        yield session
        if session.attention_mask is None:
            raise RuntimeError("model: the decoder did not run inside pruning_context")
        if engine is not None:
            stats = engine.last_stats
        else:
            stats = _analytic_stats(session.attention_mask, n_img, len(dec.layers))
        session.record = LisaRecord(
            stats=stats,
            image_tokens=n_img,
            patches=patches,
            seg_index=layout.seg_index.detach().cpu(),
            selection=session.selection,
            info=dict(session.info),
        )
        pruner.records.append(session.record)


__all__ = [
    "ExpandedLayout",
    "IMAGE_TOKEN_INDEX",
    "LisaPruner",
    "LisaRecord",
    "LisaSession",
    "QUERIES",
    "clip_model",
    "decoder",
    "expanded_layout",
    "image_starts",
    "image_token_count",
    "last_clip_attention",
    "num_patches",
    "prepare_reducer",
    "projector",
    "pruning_context",
    "seg_first_selection",
    "seg_offset",
    "seg_positions",
    "tower_geometry",
    "vision_tower",
]
