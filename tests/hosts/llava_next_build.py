"""The real patched LLaVA-NeXT fork on a tiny random LLaVA-OneVision, a synthetic RGB-D scene, and
the selector's inputs computed without the glue.

The tree comes from ``tests/hosts/upstream.py`` (submodule, else the ../shared/upstream snapshot,
``patches/LLaVA-NeXT`` applied). The model is ``tests/fixtures/llava_next/fork_check.py``'s
``tiny_fork`` (``LlavaQwenForCausalLM`` + a 2-layer 32-d ``SigLipVisionModel`` at 384 px / 14 px:
27 × 27 = 729 tokens per view, ``spatial_unpad`` merge: one newline per single-crop view).

Independent references (no ``shared`` code): SigLIP saliency (last-layer attention each token
receives, mean over queries then heads, float64), the pre-projector features (the tower's last
hidden state, as ``SigLipVisionTower.forward`` returns it), and per-token world centroids
back-projected from the canvas depth with K and cam-to-world in numpy (mean of the patch's valid
pixels; patches without depth are invalid).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Tuple

import numpy as np
import torch

from . import upstream

FORK_CHECK = upstream.ROOT / "tests" / "fixtures" / "llava_next" / "fork_check.py"
GRID, PATCH, SIZE = 27, 14, 384
IMG = -200  # llava.constants.IMAGE_TOKEN_INDEX


def import_fork(tree: upstream.PatchedTree):
    """Import the patched fork (``llava``); P0 makes model-import errors raise under LLAVA_STRICT_IMPORT=1.
    Returns ``fork_check`` loaded as a module (its ``tiny_fork``/``prompt``/``main``)."""
    os.environ["LLAVA_STRICT_IMPORT"] = "1"
    upstream.use_tree(tree.path, upstream.PACKAGES["LLaVA-NeXT"])
    import llava.model.language_model.llava_qwen  # noqa: F401

    name = "llava_next_fork_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FORK_CHECK)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@dataclass
class Scene:
    """V views of the synthetic room on the 384-px canvas: ``prep`` (PreparedViews: images, depth,
    K, cam2world) and ``images`` (V tensors (3, 384, 384), SigLIP-normalised)."""

    prep: Any
    images: List[torch.Tensor]


def scene(views: int, seed: int = 1) -> Scene:
    from shared.datasets import make_room_scene, prepare_views

    prep = prepare_views(make_room_scene(n_views=views, seed=seed), size=SIZE)
    return Scene(prep, list(prep.pixel_values()))


def centroids_by_hand(prep, grid: int = GRID, patch: int = PATCH) -> Tuple[torch.Tensor, torch.Tensor]:
    """(V, grid², 3) float64 world centroids and (V, grid²) validity, in numpy: pixel (u, v) with
    depth z > 0 goes to z · K⁻¹ (u, v, 1) in the camera, then R · p + t; each token's patch covers
    rows/cols [14 i, 14 i + 14) of the canvas (row-major tokens), its centroid is the mean point."""
    depth = prep.depth.numpy().astype(np.float64)
    K = prep.K.numpy().astype(np.float64)
    T = prep.cam2world.numpy().astype(np.float64)
    v_count = depth.shape[0]
    cent = np.zeros((v_count, grid * grid, 3))
    valid = np.zeros((v_count, grid * grid), dtype=bool)
    vv, uu = np.mgrid[0:grid * patch, 0:grid * patch]
    for v in range(v_count):
        z = depth[v, : grid * patch, : grid * patch]
        ok = np.isfinite(z) & (z > 0)
        rays = np.stack([uu, vv, np.ones_like(uu)], axis=-1).astype(np.float64) @ np.linalg.inv(K[v]).T
        cam = rays * np.where(ok, z, 0.0)[..., None]
        world = cam @ T[v, :3, :3].T + T[v, :3, 3]
        for i in range(grid):
            for j in range(grid):
                sl = (slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
                m = ok[sl]
                if m.any():
                    cent[v, i * grid + j] = world[sl][m].mean(axis=0)
                    valid[v, i * grid + j] = True
    return torch.from_numpy(cent), torch.from_numpy(valid)


@torch.no_grad()
def tower_by_hand(model, images: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(saliency (V, 729) float64, pre-projector features (V, 729, C)) of the views, from the SigLIP
    tower called directly: features = last hidden state; saliency = per head softmax(q kᵀ / √d) of
    the last layer on ``layer_norm1`` of its input, averaged over the queries, then the heads."""
    vt = model.get_model().get_vision_tower().vision_tower
    hs = vt(torch.stack(images), output_hidden_states=True).hidden_states
    last = vt.vision_model.encoder.layers[-1]
    x = last.layer_norm1(hs[-2]).double()
    att = last.self_attn
    h, d = att.num_heads, att.head_dim
    v, n, _ = x.shape
    q = torch.nn.functional.linear(x, att.q_proj.weight.double(), att.q_proj.bias.double()).view(v, n, h, d)
    k = torch.nn.functional.linear(x, att.k_proj.weight.double(), att.k_proj.bias.double()).view(v, n, h, d)
    w = torch.softmax(torch.einsum("vqhd,vkhd->vhqk", q, k) / d ** 0.5, dim=-1)  # (V, h, q, k)
    return w.mean(dim=2).mean(dim=1), hs[-1]


@torch.no_grad()
def llm_input_by_hand(model, ids: torch.Tensor, feats: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The spliced sequence the decoder must get for one sample: text embeddings, and at each image
    placeholder the projector rows of that view's kept tokens (row-major) plus ``image_newline``."""
    inner = model.get_model()
    proj = inner.mm_projector(feats)
    emb = inner.embed_tokens
    parts, prev = [], 0
    for v, p in enumerate((ids[0] == IMG).nonzero().flatten().tolist()):
        parts += [emb(ids[0, prev:p]), proj[v][keep[v]], inner.image_newline[None]]
        prev = p + 1
    parts.append(emb(ids[0, prev:]))
    return torch.cat(parts)


class DecoderInputs:
    """Captures the ``inputs_embeds`` of the first decoder call (the prefill) of a generate."""

    def __init__(self, model) -> None:
        self.embeds = None
        self._h = model.get_model().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m, _a, kwargs):
        if self.embeds is None:
            self.embeds = kwargs.get("inputs_embeds")

    def close(self) -> None:
        self._h.remove()
