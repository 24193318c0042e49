"""The real patched LLaVA-3D (tiny random weights, ``llava_3d_build``) under ``shared.prune(model, host="llava_3d")``.

Upstream code path: ``tests/hosts/upstream.py`` materialises LLaVA-3D at its pin from the checked-out submodule
with ``patches/LLaVA-3D`` applied (LLaVA-3D has no license file, so no snapshot is shared: without the submodule
every test here skips with that reason). ``generate`` runs LLaVA-3D's own ``RGBDVideoProcessor``,
``encode_rgbd_videos`` (CLIP, back-projection, ``SpatialAwareModule``, voxelisation), ``prepare_inputs_labels_
for_multimodal`` with the P2/P3 calls, and transformers 4.37.2's ``LlamaModel`` through P1.

References, apart from the glue: the same model built from the UNPATCHED tree in a subprocess (stock logits and
generation); LLaVA-3D's ``encode_rgbd_videos`` / ``PromptEncoder`` called directly (where the spliced rows must
be); voxel centroids back-projected and voxelised in numpy from the processor's depths, poses and intrinsics;
``tests/engine/reference.py``'s masking reference (every token computed, dropped tokens masked as keys, rankings
from the stock eager attention of each layer) driving a greedy loop for FastV, PyramidDrop and AdaToken-3D.

Run: ``PYTHONPATH=.venvs/tf-4.37.2 .venvs/yolo/bin/python -m pytest tests/hosts/test_llava_3d_fork.py``
(LLaVA-3D's processor imports cv2 and scipy; the tokenizer needs sentencepiece).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from . import upstream
from .llava_3d_build import require_environment as _environment
from .llava_next_build import DecoderInputs

STEPS = 4


@dataclass
class Env:
    lb: Any  # llava_3d_build
    tree: Any
    model: Any
    tok: Any
    proc: Any
    root: Path
    batch: Dict[str, torch.Tensor]
    stock: Dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


STOCK_SCRIPT = r"""
import sys, torch
from pathlib import Path
from tests.hosts import upstream, llava_3d_build as lb
work = Path(sys.argv[1])
tree = upstream.PatchedTree(Path(sys.argv[2]), None, "", ())
model, tok, proc = lb.build_tiny_llava3d(work / "stock-build", tree)
assert "pruner_glue" not in open(sys.modules["llava.model.llava_arch"].__file__).read()
model.load_state_dict(torch.load(work / "weights.pt"), strict=True)
batch = torch.load(work / "batch.pt")
with torch.no_grad():
    kw = {k: v for k, v in batch.items() if k != "inputs"}
    logits = model(input_ids=batch["inputs"], **kw).logits
    out = model.generate(**batch, max_new_tokens=%d, do_sample=False)
torch.save({"logits": logits, "generate": out}, work / "stock.pt")
""" % STEPS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    _environment()
    try:
        tree = upstream.patched_tree("LLaVA-3D")
    except upstream.Unavailable as e:  # always a skip: CI has no LLaVA-3D source
        pytest.skip(f"{e} (LLaVA-3D has no license file, so no snapshot is shared: these tests run only where "
                    "the LLaVA-3D submodule is checked out)")
    from . import llava_3d_build as lb

    root = tmp_path_factory.mktemp("llava3d")
    model, tok, proc = lb.build_tiny_llava3d(root / "build", tree)
    batch = lb.synthetic_scene_batch(tok, proc, [lb.scene_path(root / "build", 0)], [lb.QUESTIONS[0]])
    # the same weights and inputs through the UNPATCHED tree, in its own process (both trees are `llava`)
    stock_tree = upstream.materialise(upstream.locate("LLaVA-3D"), root / "stock-tree", patches_dir=root / "no-patches")
    torch.save(model.state_dict(), root / "weights.pt")
    torch.save(batch, root / "batch.pt")
    r = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, str(root), str(stock_tree.path)],
                       env=upstream.env_with_tree(stock_tree.path), cwd=str(upstream.ROOT), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    stock = torch.load(root / "stock.pt")
    return Env(lb, tree, model, tok, proc, root / "build", batch, stock)


def _generate(model, batch, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kw)


def _forward_kwargs(batch):
    return {("input_ids" if k == "inputs" else k): v for k, v in batch.items()}


# ------------------------------------------------------------------------------------ the code path
def test_the_model_is_llava_3d_s_own_patched_code(env):
    import llava.model.llava_arch as arch
    import llava.model.multimodal_encoder.video_encoder as ve

    import shared
    from shared.hosts import host_for

    assert Path(arch.__file__).resolve() == (env.tree.path / "llava" / "model" / "llava_arch.py").resolve()
    assert type(env.model).__module__ == "llava.model.language_model.llava_llama"
    vt = env.model.get_model().get_video_tower()
    assert type(vt) is ve.RGBDVideoTower and type(vt.video_processor).__name__ == "RGBDVideoProcessor"
    assert [p.name for p in env.tree.patches] == sorted(p.name for p in (upstream.ROOT / "patches" / "LLaVA-3D").glob("*.patch"))
    src = (env.tree.path / "llava" / "model" / "llava_arch.py").read_text()
    assert "pruner_glue.publish_layout(" in src and "pruner_glue.subsample(" in src
    assert "pruner_glue" not in env.tree.stock_file("llava/model/llava_arch.py")
    assert host_for(env.model).name == "llava_3d"
    assert shared.hosts.host_class("llava_3d").decoder_patched


def test_without_a_session_the_patched_fork_is_the_stock_fork(env):
    with torch.no_grad():
        logits = env.model(**_forward_kwargs(env.batch)).logits
    assert torch.equal(logits, env.stock["logits"])
    assert torch.equal(_generate(env.model, env.batch), env.stock["generate"])


@pytest.mark.parametrize("which", ["none", "fastv", "pdrop"])
def test_keeping_everything_in_a_session_is_the_stock_fork(env, which):
    import shared

    method = {"none": None, "fastv": shared.FastV(layer=2, keep_ratio=1.0),
              "pdrop": shared.PyramidDrop(layers=(1, 2, 3), ratio=1.0, positions="compact")}[which]
    methods = [] if method is None else [method]
    with shared.prune(env.model, *methods, host="llava_3d") as session:
        if method is None:
            with torch.no_grad():
                assert torch.equal(env.model(**_forward_kwargs(env.batch)).logits, env.stock["logits"])
        out = _generate(env.model, env.batch)
    assert torch.equal(out, env.stock["generate"])
    n = session.last.host["visual_tokens"][0]
    assert session.last.stats.visual[0].tolist() == [n] * 4


# ------------------------------------------------------------------------------- P2: the layout
def _session_forward(env, batch, **opts):
    import shared

    cap = DecoderInputs(env.model)
    try:
        with torch.no_grad(), shared.prune(env.model, host="llava_3d", **opts) as session:
            env.model(**_forward_kwargs(batch))
    finally:
        cap.close()
    return session.last, cap.embeds


def test_the_visual_span_is_where_the_voxel_features_are_spliced(env):
    rec, embeds = _session_forward(env, env.batch)
    ids = env.batch["inputs"][0]
    start = int((ids == -200).nonzero())
    with torch.no_grad():
        feats, offsets = env.model.encode_rgbd_videos(env.batch["images"], env.batch["depths"], env.batch["poses"],
                                                      env.batch["intrinsics"])
    n = int(offsets[0])
    assert rec.host["visual_tokens"] == [n] and rec.host["voxels"] == [n] and rec.host["subsample"] == [None]
    visual = rec.stats.stages[0][1][0]
    assert visual.tolist() == list(range(start, start + n))
    assert embeds.shape[1] == ids.shape[0] - 1 + n
    assert torch.equal(embeds[0, start:start + n], feats)
    emb = env.model.get_model().embed_tokens
    assert torch.equal(embeds[0, :start], emb(ids[:start])) and torch.equal(embeds[0, start + n:], emb(ids[start + 1:]))


def test_click_tokens_are_prompt_tokens_not_visual(env):
    lb = env.lb
    batch = lb.synthetic_scene_batch(env.tok, env.proc, [lb.scene_path(env.root, 1)], [lb.QUESTIONS[4]],
                                     clicks=[[0.5, -0.2, 0.8]])
    rec, embeds = _session_forward(env, batch)
    ids = batch["inputs"][0]
    start, loc = int((ids == -200).nonzero()), int((ids == -300).nonzero())
    n = rec.host["visual_tokens"][0]
    assert loc > start and rec.stats.stages[0][1][0].tolist() == list(range(start, start + n))
    with torch.no_grad():
        click = env.model.get_model().get_prompt_encoder()(batch["clicks"])
    row = loc - 1 + n  # the <image> id became n rows
    assert torch.equal(embeds[0, row], click[0])
    assert rec.stats.tokens[0, 0] == ids.shape[0] - 1 + n


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_and_padding(env, side):
    """Two scenes with prompts of different lengths; sample 0 is truncated inside its voxel span."""
    lb, cfg = env.lb, env.model.config
    batch = lb.synthetic_scene_batch(env.tok, env.proc, [lb.scene_path(env.root, 0), lb.scene_path(env.root, 1)],
                                     [lb.QUESTIONS[1], lb.QUESTIONS[3]])
    ids, mask = batch["inputs"], batch["attention_mask"]
    starts = [int((ids[b] == -200).nonzero()) for b in range(2)]
    with torch.no_grad():
        _, offsets = env.model.encode_rgbd_videos(batch["images"], batch["depths"], batch["poses"], batch["intrinsics"])
    ns = [int(offsets[0]), int(offsets[1] - offsets[0])]
    lens = [int(mask[b].sum()) - 1 + ns[b] for b in range(2)]
    limit = starts[0] + ns[0] // 2
    old = (getattr(cfg, "tokenizer_model_max_length", None), cfg.tokenizer_padding_side)
    cfg.tokenizer_model_max_length, cfg.tokenizer_padding_side = limit, side
    try:
        rec, embeds = _session_forward(env, batch)
    finally:
        cfg.tokenizer_model_max_length, cfg.tokenizer_padding_side = old
    kept = [min(n, limit) for n in lens]
    width = max(kept)
    assert embeds.shape[1] == width
    for b in range(2):
        pad = width - kept[b] if side == "left" else 0
        vis = list(range(pad + starts[b], pad + min(starts[b] + ns[b], kept[b])))
        assert rec.stats.stages[0][1][b].tolist() == vis
        assert rec.host["visual_tokens"][b] == len(vis) and rec.host["voxel_xyz"][b].shape == (len(vis), 3)
    assert rec.host["visual_tokens"][0] == ns[0] // 2  # cut inside the span


# --------------------------------------------------------------------------- P3: voxel positions
def centroids_by_hand(depths, poses, intrinsics, grid: int, voxel: float = 0.2) -> np.ndarray:
    """(N, 3) voxel centroids of one scene in numpy: pixel (u, v) with depth z goes to pose · (z (u - cx) / fx,
    z (v - cy) / fy, z, 1); each of the grid x grid patch tokens takes the pixel nearest-interpolation picks
    (row/col ``floor(i · S / grid)``); points are voxelised at round(xyz / 0.2), voxels ordered
    lexicographically by (x, y, z) cell, each the mean of its points."""
    d = depths.double().numpy()
    T = poses.double().numpy()
    K = intrinsics.double().numpy()
    v_count, size = d.shape[0], d.shape[1]
    pix = (np.arange(grid) * size) // grid
    pts = []
    for v in range(v_count):
        for i in pix:
            for j in pix:
                z = d[v, i, j]
                cam = np.array([(j - K[v, 0, 2]) * z / K[v, 0, 0], (i - K[v, 1, 2]) * z / K[v, 1, 1], z, 1.0])
                w = T[v] @ cam
                pts.append(w[:3] / w[3])
    pts = np.array(pts)
    cells = np.round(pts.astype(np.float32) / np.float32(voxel)).astype(np.int64)
    _, inv = np.unique(cells, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    return np.stack([pts[inv == k].mean(axis=0) for k in range(inv.max() + 1)])


def test_published_voxel_positions_are_the_voxel_centroids(env):
    lb = env.lb
    batch = lb.synthetic_scene_batch(env.tok, env.proc, [lb.scene_path(env.root, 0), lb.scene_path(env.root, 1)],
                                     [lb.QUESTIONS[0], lb.QUESTIONS[2]])
    rec, _ = _session_forward(env, batch)
    grid = lb.CLIP_SIZE // lb.CLIP_PATCH
    for b in range(2):
        want = centroids_by_hand(batch["depths"][b], batch["poses"][b], batch["intrinsics"][b], grid)
        got = rec.host["voxel_xyz"][b]
        assert got.shape == want.shape == (rec.host["visual_tokens"][b], 3)
        assert np.allclose(got.numpy(), want, atol=1e-4), np.abs(got.numpy() - want).max()
    # the room spans metres: the positions are real geometry, not a constant
    assert float(rec.host["voxel_xyz"][0].std(0).min()) > 0.2


def test_subsample_routing_is_upstream_s_randperm_and_seedable(env):
    from shared.hosts import llava_3d

    for n in (2561, 4000):
        torch.manual_seed(5)
        want = torch.randperm(n)[:2560]
        torch.manual_seed(5)
        assert torch.equal(llava_3d.subsample_indices(n, 2560), want)
        torch.manual_seed(5)
        assert torch.equal(llava_3d.subsample(env.model, 0, n, 2560), want)  # no session: upstream's draw
        seeded = torch.randperm(n, generator=torch.Generator().manual_seed(7))[:2560]
        assert torch.equal(llava_3d.subsample_indices(n, 2560, seed=7), seeded)
        assert not torch.equal(seeded, want)


def test_subsample_keeps_the_published_positions_aligned(env):
    """The glue alone on a synthetic 3000-voxel scene (a real scene above 2560 voxels is too slow here): the
    session's subsample is the seeded draw, and the published xyz are the kept voxels' centroids in token order."""
    import shared
    from shared.hosts import llava_3d

    g = torch.Generator().manual_seed(0)
    pts = torch.rand(1, 3000, 3, generator=g, dtype=torch.float64) * 10
    p2v = torch.arange(3000)[None].roll(7, dims=1)  # one point per voxel: the centroid is the point
    ids = [torch.tensor([1, 5, -200, 6, 7])]
    with shared.prune(env.model, host="llava_3d", subsample_seed=3):
        tower = env.model.get_model().get_video_tower()
        session = llava_3d.session_of(env.model)
        llava_3d.publish_voxels(tower, pts, p2v)
        kept = llava_3d.subsample(env.model, 0, 3000, 2560)
        assert torch.equal(kept, torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:2560])
        masks = [llava_3d.segment_mask([torch.zeros(2, 1), torch.zeros(2560, 1), torch.zeros(2, 1)], [-200])]
        llava_3d.publish_layout(env.model, masks, torch.ones(1, 2564, dtype=torch.bool), ids, [0])
        info = session._pending["host_info"]
    by_voxel = torch.empty(3000, 3, dtype=torch.float64)
    by_voxel[p2v[0]] = pts[0]
    assert torch.equal(info["subsample"][0], kept) and info["voxels"] == [3000]
    assert torch.allclose(info["voxel_xyz"][0], by_voxel[kept], atol=0, rtol=0)


# ---------------------------------------------------------------------- (c) methods on the real fork
def _reference_greedy(model, embeds, alive_layers, positions, steps=STEPS) -> List[int]:
    """Greedy decoding with the masking reference: every step recomputes prompt + generated tokens."""
    from tests.engine import reference

    emb = model.get_model().embed_tokens
    seq = embeds
    out = []
    with torch.no_grad():
        for _ in range(steps):
            hidden = reference.run_schedule(model, seq, alive_layers, positions)
            tok = int(model.lm_head(hidden[:, -1]).argmax(-1))
            out.append(tok)
            seq = torch.cat([seq, emb(torch.tensor([[tok]]))], dim=1)
    return out


#: a hand-set AdaToken-3D retention O(i), i = 1..4 (the fork's 4 layers); 0.55 and 0.5 floor to one count at
#: small N, so the running minimum is exercised
RETENTION = (1.0, 0.55, 0.5, 0.25)


def _adatoken():
    from shared.methods.adatoken import AdaToken3D, AdaTokenSchedule

    # stored budgets at a nominal N = 100; the method recomputes them from each sample's own N
    sched = AdaTokenSchedule(r=RETENTION[-1], alpha=1.0, beta=0.5, L_c=0.0, M=0.0, retention=RETENTION,
                             budgets=(100, 55, 50, 25), visual_tokens=100)
    return AdaToken3D(fitted=sched)


def adatoken_counts_by_hand(retention, n: int) -> List[int]:
    """Per layer k_i = max(1, floor(O(i) · N)), then a running minimum (the counts never grow again)."""
    out: List[int] = []
    for o in retention:
        k = max(1, int(np.floor(o * n)))
        out.append(k if not out else min(out[-1], k))
    return out


@pytest.mark.parametrize("which", ["fastv", "pdrop-compact", "adatoken3d"])
def test_pruning_follows_its_schedule_and_equals_the_masking_reference(env, which):
    import shared
    from tests.engine import reference

    rec, embeds = _session_forward(env, env.batch)
    n = rec.host["visual_tokens"][0]
    start = int(rec.stats.stages[0][1][0][0])
    length = embeds.shape[1]
    if which == "fastv":
        method = shared.FastV(layer=2, keep=n // 4)
        events = reference.fastv_events(2, n // 4)
    elif which == "pdrop-compact":
        method = shared.PyramidDrop(layers=(1, 2, 3), ratio=0.5, positions="compact")
        events = reference.pdrop_events(method.layers, method.keep_counts(n))
    else:
        method = _adatoken()
        counts = adatoken_counts_by_hand(RETENTION, n)
        assert counts[-1] < n
        drops = [layer for layer in range(1, 4) if counts[layer] < counts[layer - 1]]
        events = reference.pdrop_events(drops, [counts[layer] for layer in drops])
    positions = getattr(method, "positions", "original")
    cap = DecoderInputs(env.model)
    try:
        with shared.prune(env.model, method, host="llava_3d") as session:
            out = _generate(env.model, env.batch, use_cache=True)
    finally:
        cap.close()
    assert torch.equal(cap.embeds, embeds)
    vis = session.last.stats.visual[0].tolist()
    assert vis == (adatoken_counts_by_hand(RETENTION, n) if which == "adatoken3d" else method.schedule(n, 4))
    assert vis[-1] < n
    _, kept, _, alive = reference.run(env.model, embeds, (start, start + n), length - 1, events, positions=positions)
    assert [len(k) for k in kept] == vis
    want = _reference_greedy(env.model, embeds, alive, positions)
    assert out[0, -STEPS:].tolist() == want, f"{which}: cached generate differs from the masking reference"


# ------------------------------------------------------------------------------------- the matrix
def _fork_method(label, method, n, layers):
    """A matrix row's method at the fork's sizes: (pruning config, keep-everything config)."""
    from shared.apps import matrix

    if label == "adatoken3d":  # a schedule fits one layer count: rebuilt for the fork's decoder
        return matrix.adatoken_row(layers), matrix.adatoken_keep_all(layers)
    if label.startswith("fastv") or label == "random":
        return method, replace(method, keep=None, keep_ratio=1.0)
    if label.startswith("pdrop"):
        return method, replace(method, ratio=1.0)
    if label.startswith("lvlm_csp"):
        return replace(method, cluster_tokens=n // 2, prune_tokens=n // 4), replace(method, cluster_tokens=n, prune_tokens=n)
    raise AssertionError(f"{label}: no fork sizes for a ✔ cell")


@pytest.mark.parametrize("label", [label for label, _ in __import__("shared.apps.matrix", fromlist=["ROWS"]).ROWS])
def test_matrix_cell_on_the_fork(env, label):
    """Each row of ``python -m shared.apps.matrix`` on the real fork: a ✔ cell keeping everything generates what
    the unpruned fork generates and a pruning config follows its schedule; a ✘ cell is refused naming the need."""
    import shared
    from shared.apps import matrix
    from shared.needs import MissingNeed

    method = dict(matrix.ROWS)[label]
    cell = matrix.cell(method, "llava_3d")
    if cell.startswith("✘"):
        need = cell[2:].split(",")[0]
        with pytest.raises(MissingNeed, match=rf"^method: {method.name} needs .*'{need}'.*host 'llava_3d'"):
            with shared.prune(env.model, method, host="llava_3d"):
                pass
        return
    assert cell == "✔"
    rec, _ = _session_forward(env, env.batch)
    n = rec.host["visual_tokens"][0]
    layers = env.model.config.num_hidden_layers
    prune_cfg, full = _fork_method(label, method, n, layers)
    with shared.prune(env.model, full, host="llava_3d", sample_keys=["scene0"]):
        out = _generate(env.model, env.batch)
    assert torch.equal(out, env.stock["generate"]), f"{label}: keeping everything changed the generation"
    with shared.prune(env.model, prune_cfg, host="llava_3d", sample_keys=["scene0"]) as session:
        _generate(env.model, env.batch)
    vis = session.last.stats.visual[0].tolist()
    assert len(vis) == layers
    if label == "adatoken3d":  # the budgets for this scene's N, from the fitted retention by hand
        assert vis == adatoken_counts_by_hand(prune_cfg.fitted_schedule.retention, n)
    else:
        assert vis == (prune_cfg.schedule(n, layers, vis[0]) if label.startswith("lvlm_csp")
                       else prune_cfg.schedule(n, layers))
    assert vis[-1] < n
