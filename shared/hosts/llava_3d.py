"""Host adapter: the patched LLaVA-3D fork (``patches/LLaVA-3D``; Vicuna-7B LLaMA, voxelised RGB-D scenes).

LLaVA-3D turns a posed RGB-D video into N "3D patch" tokens: CLIP patch features of V views plus a 3D
position embedding, averaged per 0.2 m voxel (``RGBDVideoTower.forward``; N varies per scene, at most
2560 after a random subsample in ``prepare_inputs_labels_for_multimodal``). They are spliced in place of
the ``<image>`` id (-200); each ``<boxes>`` click (``LOC_TOKEN_INDEX`` -300) becomes one prompt token.

The patch series only adds annotated calls into this module, each a no-op unless a session
(``shared.prune(model, method, host="llava_3d")``) is active on the model:

- **P1** ``llama_forward``: ``LlavaLlamaModel.forward`` (which LLaVA-3D inherits from transformers'
  ``LlamaModel``) routes to the session's engine while an in-LLM method is active, and to
  ``super().forward`` with the arguments unchanged otherwise.
- **P2** ``segment_mask`` / ``publish_layout``: the visual-token mask of the spliced batch, after
  truncation and left/right padding (click tokens are prompt tokens, not visual), handed to the session.
- **P3** ``publish_voxels`` (in ``RGBDVideoTower.forward`` after ``voxelize``): each voxel token's 3D
  position, the mean of the xyz of the patch points it pools; ``subsample`` replaces the
  ``torch.randperm(n)[:2560]`` of the > 2560 subsample (same draw from the global RNG unless the
  ``subsample_seed`` option is set) and records the kept voxels so the positions stay aligned.

Where the positions are (per prefill, ``ForwardRecord.host`` of ``session.last``)::

    rec.host["voxel_xyz"][b]      # (N_b, 3) float64 world xyz of sample b's visual tokens, in the order
                                  # they enter the LLM (after the subsample and any truncation);
                                  # None for a sample without a scene (2D image or text only)
    rec.host["subsample"][b]      # (2560,) long voxel indices kept by the subsample, or None
    rec.host["voxels"][b]         # voxels of the scene before the subsample (None without a scene)
    rec.host["visual_tokens"][b]  # N_b, visual tokens of sample b in the LLM input

Options: ``sample_keys`` (per sample keys handed to the engine, e.g. for LVLM_CSP's random draws),
``subsample_seed`` (int: every scene's > 2560 subsample is ``torch.randperm(n, generator=
torch.Generator().manual_seed(subsample_seed))[:2560]``, the same for a scene whatever the batch;
None: upstream's unseeded draw from the global RNG), ``query_index`` ((B,) query rows for the
in-LLM ranking; default the engine's, the last prompt token).
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import splice
from .base import HostAdapter, register_host, session_of

#: llava.constants.IMAGE_TOKEN_INDEX / LOC_TOKEN_INDEX
IMAGE_TOKEN_INDEX = -200
LOC_TOKEN_INDEX = -300
#: the voxel-token cap of ``prepare_inputs_labels_for_multimodal`` (L227-228 at the pin)
MAX_VOXEL_TOKENS = 2560


def video_tower(model: nn.Module) -> Optional[nn.Module]:
    """The ``RGBDVideoTower`` of a LLaVA-3D model (``get_model().get_video_tower()``), or None."""
    get_model = getattr(model, "get_model", None)
    inner = get_model() if callable(get_model) else None
    get_tower = getattr(inner, "get_video_tower", None)
    return get_tower() if callable(get_tower) else None


# ------------------------------------------------------------------------------------ the host
@register_host
class Llava3DHost(HostAdapter):
    name = "llava_3d"
    always = frozenset({"decoder"})
    options = {"sample_keys": None, "subsample_seed": None, "query_index": None}
    decoder_patched = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """LLaVA-3D's ``LlavaLlamaForCausalLM``: encodes RGB-D videos and has a voxelising video tower
        (LLaVA-NeXT's and LISA's LLaVA llama classes have neither)."""
        if type(model).__name__ != "LlavaLlamaForCausalLM" or not callable(getattr(model, "encode_rgbd_videos", None)):
            return False
        tower = video_tower(model)
        return tower is not None and hasattr(tower, "voxel_size")

    def check_options(self) -> None:
        seed = self.opts["subsample_seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"subsample_seed: expected a non-negative int or None, got {seed!r}")
        self.clear_pending()

    def clear_pending(self) -> None:
        #: per scene of the last video encoding: (n_v, 3) voxel centroids, and the flat offset of its first voxel
        self.pending_xyz: Optional[List[torch.Tensor]] = None
        self.pending_starts: List[int] = []
        #: scene → kept voxel indices of the > 2560 subsample
        self.pending_kept: Dict[int, torch.Tensor] = {}

    def decoder(self) -> nn.Module:
        return self.model.get_model()

    def attach_points(self) -> List[nn.Module]:
        points = [self.model, self.model.get_model()]
        tower = video_tower(self.model)
        if tower is not None:
            points.append(tower)
        return points

    def install(self, session: Any, stack: ExitStack) -> None:
        def after_decoder(_m, _args, _kwargs, _out):
            session.finish()

        stack.callback(self.decoder().register_forward_hook(after_decoder, with_kwargs=True).remove)
        stack.callback(self.clear_pending)


# --------------------------------------------------------------------------------------- P1
def llama_forward(decoder: nn.Module, stock_forward: Callable, *args: Any, **kwargs: Any):
    """[P1] ``LlavaLlamaModel.forward``: the session's engine while an in-LLM method is active, else
    ``stock_forward`` (``super().forward``, transformers' ``LlamaModel.forward``) with the arguments unchanged."""
    session = session_of(decoder)
    if session is None:
        return stock_forward(*args, **kwargs)
    return session.decoder_forward(stock_forward, *args, **kwargs)


# --------------------------------------------------------------------------------------- P3
def voxel_centroids(xyz: torch.Tensor, point_to_voxel: torch.Tensor) -> List[torch.Tensor]:
    """Per scene, the mean position of the points each voxel pools.

    xyz: (B, V, H, W, 3) patch positions (``backprojector_dataloader``'s ``feat_xyz``) or (B, P, 3);
    point_to_voxel: (B, P) long voxel of each point (``voxelize``; ids 0..n_b-1, as ``scatter_mean``
    uses them). Returns B tensors (n_b, 3) float64 with n_b = max id + 1 (upstream's ``batch_offset``).
    """
    b = xyz.shape[0]
    pts = xyz.reshape(b, -1, 3).detach().double()
    p2v = point_to_voxel.reshape(b, -1).long().to(pts.device)
    if p2v.shape[1] != pts.shape[1]:
        raise ValueError(f"point_to_voxel: expected (B, {pts.shape[1]}) voxel ids, got {tuple(point_to_voxel.shape)}")
    out = []
    for i in range(b):
        n = int(p2v[i].max()) + 1
        sums = torch.zeros(n, 3, dtype=torch.float64, device=pts.device).index_add_(0, p2v[i], pts[i])
        counts = torch.bincount(p2v[i], minlength=n).to(torch.float64)
        out.append((sums / counts.clamp(min=1)[:, None]).cpu())
    return out


def publish_voxels(tower: nn.Module, xyz: torch.Tensor, point_to_voxel: torch.Tensor) -> None:
    """[P3] ``RGBDVideoTower.forward`` after ``voxelize``: keep each scene's voxel centroids
    (``voxel_centroids``) for the next ``publish_layout`` (no-op without a session)."""
    session = session_of(tower)
    if session is None:
        return
    host = session.host
    cents = voxel_centroids(xyz, point_to_voxel)
    host.pending_xyz = cents
    host.pending_kept = {}
    starts, acc = [], 0
    for c in cents:
        starts.append(acc)
        acc += int(c.shape[0])
    host.pending_starts = starts


def subsample_indices(n: int, limit: int = MAX_VOXEL_TOKENS, seed: Optional[int] = None) -> torch.Tensor:
    """The voxel tokens LLaVA-3D keeps of a scene with ``n`` > ``limit``: ``torch.randperm(n)[:limit]``
    drawn from the global (CPU) RNG as upstream does, or from ``torch.Generator().manual_seed(seed)``.
    Returns (limit,) long, in draw order (upstream does not sort them)."""
    if seed is None:
        return torch.randperm(n)[:limit]
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:limit]


def subsample(model: nn.Module, start: int, n: int, limit: int = MAX_VOXEL_TOKENS) -> torch.Tensor:
    """[P3] The > ``limit`` subsample of the scene whose voxels start at flat offset ``start``:
    ``subsample_indices(n, limit)`` without a session (upstream's exact draw), seeded with the host's
    ``subsample_seed`` with one; the kept indices are recorded to align the published positions."""
    session = session_of(model)
    if session is None:
        return subsample_indices(n, limit)
    host = session.host
    kept = subsample_indices(n, limit, host.opts["subsample_seed"])
    if host.pending_xyz is not None:
        if int(start) not in host.pending_starts:
            raise RuntimeError(f"start: no scene of the last video encoding starts at voxel {start} "
                               f"(starts {host.pending_starts})")
        scene = host.pending_starts.index(int(start))
        if int(host.pending_xyz[scene].shape[0]) != int(n):
            raise RuntimeError(f"n: scene {scene} has {host.pending_xyz[scene].shape[0]} voxels, the subsample saw {n}")
        host.pending_kept[scene] = kept.clone()
    return kept


# --------------------------------------------------------------------------------------- P2
def segment_mask(segments: Sequence[torch.Tensor], specials: Optional[Sequence[Any]] = None) -> torch.Tensor:
    """[P2] Visual-token mask (n,) bool of one sample's spliced segments [text, special, text, ...]:
    an odd segment is visual iff its placeholder id (``specials``) is ``IMAGE_TOKEN_INDEX``; click
    tokens (``LOC_TOKEN_INDEX``) are not. ``specials=None`` with a single segment: a sample without image."""
    return splice.segment_mask(segments, specials=[] if specials is None else specials,
                               image_token_index=IMAGE_TOKEN_INDEX)


def _features_per_sample(input_ids: Sequence[torch.Tensor]) -> List[List[int]]:
    """Indices into ``image_features`` each sample consumes, as the splice loop walks them (one per
    ``<image>`` id; a sample without one consumes one with no rows)."""
    out, k = [], 0
    for ids in input_ids:
        n = int((ids == IMAGE_TOKEN_INDEX).sum())
        out.append(list(range(k, k + n)))
        k += max(n, 1)
    return out


def _scene_positions(host: Llava3DHost, input_ids: Sequence[torch.Tensor], video_idx: Sequence[int],
                     visual: torch.Tensor) -> Dict[str, List[Any]]:
    """Per sample: the xyz of its visual tokens in LLM order, the subsample and the voxel counts."""
    video_idx = [int(v) for v in video_idx]
    cents = host.pending_xyz
    xyz, kept, voxels = [], [], []
    for b, feats in enumerate(_features_per_sample(input_ids)):
        rows, sub, vox = [], None, None
        for f in feats:
            if f not in video_idx or cents is None:
                rows = None
                break
            scene = video_idx.index(f)
            c = cents[scene]
            vox = int(c.shape[0])
            if scene in host.pending_kept:
                sub = host.pending_kept[scene]
                c = c[sub]
            rows.append(c)
        n = int(visual[b].sum())
        if rows is None or not rows:
            xyz.append(None)
        else:
            pos = torch.cat(rows)
            if pos.shape[0] < n:
                raise RuntimeError(f"sample {b}: {n} visual tokens but {pos.shape[0]} voxel positions")
            xyz.append(pos[:n])  # truncation keeps the first tokens
        kept.append(sub)
        voxels.append(vox)
    return {"voxel_xyz": xyz, "subsample": kept, "voxels": voxels}


def publish_layout(model: nn.Module, masks: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                   input_ids: Sequence[torch.Tensor], video_idx: Sequence[int] = ()) -> None:
    """[P2] Hand the spliced batch's layout to the session (no-op without one).

    masks: per sample the (n_b,) visual mask of its untruncated spliced sequence (``segment_mask``);
    attention_mask: (B, L) bool of the padded batch; input_ids: per sample the unpadded prompt ids
    (placeholders included); video_idx: the positions in ``images`` that are RGB-D videos (scenes).
    The session gets ``visual_mask`` (B, L) and, in ``ForwardRecord.host``, each sample's voxel
    positions (see the module docstring).
    """
    session = session_of(model)
    if session is None:
        return
    host = session.host
    visual = splice.padded_visual_mask(masks, attention_mask)
    info = _scene_positions(host, input_ids, video_idx, visual)
    info["visual_tokens"] = [int(n) for n in visual.sum(1)]
    host.clear_pending()
    session.prefill(visual_mask=visual, attention_mask=attention_mask.bool().clone(),
                    query_index=host.opts["query_index"], sample_keys=host.opts["sample_keys"], host_info=info)


__all__ = [
    "IMAGE_TOKEN_INDEX",
    "LOC_TOKEN_INDEX",
    "Llava3DHost",
    "MAX_VOXEL_TOKENS",
    "llama_forward",
    "publish_layout",
    "publish_voxels",
    "segment_mask",
    "subsample",
    "subsample_indices",
    "video_tower",
    "voxel_centroids",
]
