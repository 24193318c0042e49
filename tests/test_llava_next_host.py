"""The LLaVA-NeXT host: the patch series (patches/LLaVA-NeXT) and the glue it calls (shared.hosts.llava_next).

The glue is tested on a fake fork (the module paths the patch uses: get_vision_tower().vision_tower
.vision_model.encoder.layers[-1].self_attn, get_model().mm_projector / image_newline) so no LLaVA-NeXT
checkout is needed. The series itself is checked against the submodule when it is checked out.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shared.hosts import llava_next
from shared.hosts.selection import SceneGeometry, compact_view, scene_context
from shared.methods.segpruner import SeGPruner

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches" / "LLaVA-NeXT").glob("*.patch"))
PIN = "e9835311c6f515a13702eb7a7750fcd936f65ed8"
PATCHED_FILES = ("llava/model/__init__.py", "llava/model/llava_arch.py", "llava/model/language_model/llava_qwen.py")
IMG = llava_next.IMAGE_TOKEN_INDEX


# ----------------------------------------------------------------------------------- the series
def test_series_is_thin_and_annotated():
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002", "0003", "0004"]
    touched = set()
    for p in PATCHES:
        text = p.read_text()
        assert re.search(r"^Subject: \[PATCH \d/4\] Pruner P\d:", text, re.M), p.name
        files = re.findall(r"^diff --git a/(\S+) b/", text, re.M)
        touched.update(files)
        body = text.split("\ndiff --git", 1)[1]
        removed = [ln for ln in body.splitlines() if ln.startswith("-") and not ln.startswith("---")]
        assert removed == [], f"{p.name} removes upstream lines: {removed}"
        for hunk in re.split(r"^@@", body, flags=re.M)[1:]:
            assert "[Pruner]" in hunk, f"{p.name}: a hunk without a [Pruner] marker"
    assert touched == set(PATCHED_FILES)
    calls = "".join(p.read_text() for p in PATCHES)
    for fn in ("select_image_tokens", "segment_mask", "publish_visual_mask", "qwen2_forward"):
        assert f"pruner_glue.{fn}(" in calls and hasattr(llava_next, fn)


def _submodule() -> Path:
    sub = ROOT / "LLaVA-NeXT"
    if not (sub / ".git").exists():
        pytest.skip("LLaVA-NeXT submodule is not checked out (git submodule update --init LLaVA-NeXT); "
                    "the series was checked with git am on a scratch clone of the pin when it was written")
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    return sub


def test_series_applies_on_the_pin():
    _submodule()
    r = subprocess.run(["bash", str(ROOT / "scripts" / "apply_patches.sh"), "--check", "LLaVA-NeXT"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check OK: 4 patch(es) apply cleanly" in r.stdout


@pytest.fixture
def patched_tree(tmp_path):
    sub = _submodule()
    if subprocess.run(["git", "-C", str(sub), "cat-file", "-e", PIN + "^{commit}"]).returncode != 0:
        pytest.skip(f"the pinned commit {PIN} is not in the submodule")
    tree = tmp_path / "llava-next"
    ident = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "-C", str(sub), "worktree", "add", "--quiet", "--detach", str(tree), PIN], check=True)
    try:
        r = subprocess.run(["git", *ident, "-C", str(tree), "am", "--quiet", *map(str, PATCHES)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        yield tree
    finally:
        subprocess.run(["git", "-C", str(sub), "worktree", "remove", "--force", str(tree)], capture_output=True)


def test_patched_files_byte_compile(patched_tree):
    for f in PATCHED_FILES:
        r = subprocess.run([sys.executable, "-m", "py_compile", str(patched_tree / f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_patched_fork_end_to_end(patched_tree):
    """The patched fork on a tiny random LLaVA-OneVision under transformers 4.40 (its pinned generation)."""
    env_dir = ROOT / ".venvs" / "tf-4.40.2"
    if not env_dir.is_dir():
        pytest.skip("transformers 4.40 test env missing (bash scripts/setup_test_envs.sh 4.40.2)")
    pp = os.pathsep.join([str(env_dir), str(patched_tree), str(ROOT)])
    probe = subprocess.run([sys.executable, "-c", "import einops"], env={**os.environ, "PYTHONPATH": pp})
    if probe.returncode != 0:
        pytest.skip("LLaVA-NeXT's model code imports einops, which this environment lacks (pip install einops)")
    script = ROOT / "tests" / "fixtures" / "llava_next" / "fork_check.py"
    r = subprocess.run([sys.executable, "-W", "ignore", str(script)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": pp, "LLAVA_STRICT_IMPORT": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fork check OK" in r.stdout


# ------------------------------------------------------------------------------- a fake fork
class FakeAttention(nn.Module):
    """The attributes shared.scoring reads (q_proj, k_proj, num_heads, head_dim); forward is a no-op."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.num_heads, self.head_dim = heads, c // heads

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        return hidden_states, None


class FakeFork(nn.Module):
    """Module paths of LLaVA-NeXT's LlavaQwenForCausalLM that the glue touches, and a fork-like encode+merge."""

    def __init__(self, c=8, d=6, grid=3, merge="spatial_unpad", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(mm_patch_merge_type=merge)
        self.grid = grid
        layer = nn.Module()
        layer.self_attn = FakeAttention(c, 2)
        self.tower = nn.Module()
        self.tower.vision_tower = nn.Module()
        self.tower.vision_tower.vision_model = nn.Module()
        self.tower.vision_tower.vision_model.encoder = nn.Module()
        self.tower.vision_tower.vision_model.encoder.layers = nn.ModuleList([layer])
        self.inner = nn.Module()
        self.inner.mm_projector = nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
        self.inner.image_newline = nn.Parameter(torch.randn(d))

    def get_vision_tower(self):
        return self.tower

    def get_model(self):
        return self.inner

    def attn(self):
        return self.tower.vision_tower.vision_model.encoder.layers[-1].self_attn

    def encode_and_merge(self, hidden):
        """As prepare_inputs_labels_for_multimodal up to P1: tower (last attention sees ``hidden``),
        projector on the tower output, single-crop merge (+ newline with spatial_unpad)."""
        self.attn()(hidden)
        feats = torch.tanh(hidden) * 2.0  # stands for the tower output fed to the projector
        proj = self.inner.mm_projector(feats)
        nl = self.config.mm_patch_merge_type.startswith("spatial") and "unpad" in self.config.mm_patch_merge_type
        merged = [torch.cat([p, self.inner.image_newline[None]]) if nl else p for p in proj]
        return merged, feats, proj


def reference_saliency(attn: FakeAttention, hidden: torch.Tensor) -> torch.Tensor:
    """Received attention written out: per head softmax(q kᵀ / sqrt(d)), mean over queries, then heads."""
    b, n, c = hidden.shape
    out = torch.zeros(b, n, dtype=torch.float64)
    for h in range(attn.num_heads):
        sl = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        q = attn.q_proj(hidden).double()[..., sl]
        k = attn.k_proj(hidden).double()[..., sl]
        w = torch.softmax(q @ k.transpose(1, 2) / attn.head_dim ** 0.5, dim=-1)
        out += w.mean(dim=1)
    return out / attn.num_heads


def _ids(*images_per_sample, length=12):
    rows = []
    for n in images_per_sample:
        r = torch.arange(1, length + 1)
        r[1:1 + n] = IMG
        rows.append(r)
    return torch.stack(rows)


# ------------------------------------------------------------------------------- P1 layout
def test_single_crop_layout_keeps_grid_subset_in_row_major_order_plus_newline():
    fork = FakeFork(grid=3)
    hidden = torch.randn(4, 9, 8)
    t = 4
    with llava_next.attach(fork), scene_context(SeGPruner(tokens=t, important_ratio=1.0)) as ctx:
        merged, feats, proj = fork.encode_and_merge(hidden)
        out = llava_next.select_image_tokens(fork, merged, split_sizes=[1] * 4, input_ids=_ids(4))
    sal = reference_saliency(fork.attn(), hidden)
    assert torch.allclose(ctx.last.saliency.double(), sal, atol=1e-6)
    for v in range(4):
        top = sorted(torch.argsort(sal[v], descending=True, stable=True)[:t].tolist())
        expect = torch.cat([proj[v][top], fork.inner.image_newline[None]])
        assert out[v].shape == (t + 1, 6)
        assert torch.equal(out[v], expect)  # kept rows in row-major order, newline last
    assert ctx.last.per_view == [t] * 4 and ctx.last.llm_tokens == 4 * (t + 1)


def test_flat_merge_has_no_newline_and_geometry_reaches_the_selector():
    fork = FakeFork(grid=3, merge="flat")
    hidden = torch.randn(2, 9, 8)
    g = torch.Generator().manual_seed(3)
    geom = SceneGeometry(centroids=torch.rand(2, 9, 3, generator=g, dtype=torch.float64))
    pruner = SeGPruner(tokens=3, important_ratio=0.0, lam=1.0)
    with llava_next.attach(fork), scene_context(pruner, views=geom, grid=3) as ctx:
        merged, feats, proj = fork.encode_and_merge(hidden)
        out = llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1], input_ids=_ids(2))
    keep = pruner.select(ctx.last.saliency, feats, geom.centroids)
    for v in range(2):
        assert torch.equal(out[v], proj[v][keep[v]])  # 3 rows, no newline


def test_samples_are_selected_separately_and_per_scene_budget_is_shared():
    fork = FakeFork(grid=3)
    hidden = torch.randn(3, 9, 8)
    with llava_next.attach(fork), scene_context(SeGPruner(tokens=5, important_ratio=1.0, mode="per_scene")) as ctx:
        merged, _, _ = fork.encode_and_merge(hidden)
        out = llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1, 1], input_ids=_ids(2, 1))
    assert [(r.sample, r.keep.shape[0]) for r in ctx.records] == [(0, 2), (1, 1)]
    assert sum(ctx.records[0].per_view) == 5 and ctx.records[1].per_view == [5]
    assert [o.shape[0] for o in out] == [n + 1 for n in ctx.records[0].per_view] + [6]


def test_no_context_is_a_no_op_and_context_without_attach_is_an_error():
    fork = FakeFork()
    merged, _, _ = fork.encode_and_merge(torch.randn(2, 9, 8))
    assert llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1]) is merged
    with scene_context(SeGPruner(tokens=2, important_ratio=1.0)), pytest.raises(RuntimeError, match="^model: .*attach"):
        llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1])
    with llava_next.attach(fork):
        with pytest.raises(RuntimeError, match="already attached"), llava_next.attach(fork):
            pass
    assert not fork.attn()._forward_pre_hooks and not fork.inner.mm_projector._forward_pre_hooks


def test_multi_crop_and_video_are_refused():
    fork = FakeFork()
    pruner = SeGPruner(tokens=2, important_ratio=1.0)
    with llava_next.attach(fork), scene_context(pruner):
        merged, _, _ = fork.encode_and_merge(torch.randn(3, 9, 8))
        with pytest.raises(NotImplementedError, match=r"^images: .*image 1 has 2 crops"):
            llava_next.select_image_tokens(fork, merged[:2], split_sizes=[1, 2])
        with pytest.raises(NotImplementedError, match=r"^images: .*videos"):
            llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1, 1], video_idx=[0])


def test_layout_and_placeholder_errors_name_the_parameter():
    fork = FakeFork(grid=3)
    with llava_next.attach(fork), scene_context(SeGPruner(tokens=2, important_ratio=1.0)):
        merged, _, _ = fork.encode_and_merge(torch.randn(2, 9, 8))
        with pytest.raises(ValueError, match=r"^input_ids: .*3 image placeholders"):
            llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1], input_ids=_ids(3))
        merged, _, _ = fork.encode_and_merge(torch.randn(2, 9, 8))
        with pytest.raises(ValueError, match=r"^image_features\[0\]: expected \(10, D\)"):
            llava_next.select_image_tokens(fork, [m[:-2] for m in merged], split_sizes=[1, 1])
    with pytest.raises(ValueError, match="^keep: "):
        compact_view(torch.zeros(10, 2), torch.ones(9, dtype=torch.long))


def test_selector_needing_geometry_without_views_is_an_error():
    fork = FakeFork()
    with llava_next.attach(fork), scene_context(SeGPruner(tokens=4, important_ratio=0.5)):
        merged, _, _ = fork.encode_and_merge(torch.randn(1, 9, 8))
        with pytest.raises(ValueError, match=r"^views: SeGPruner picks 2 tokens by 3D distance"):
            llava_next.select_image_tokens(fork, merged, split_sizes=[1])


# ------------------------------------------------------------------------------- P2 mask
def test_segment_mask_alternates_text_and_image():
    segs = [torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(2, 2), torch.zeros(1, 2), torch.zeros(0, 2)]
    assert llava_next.segment_mask(segs).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    assert llava_next.segment_mask([torch.zeros(3, 2)]).tolist() == [False] * 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_visual_mask_honours_truncation_and_padding(side):
    # sample 0: text 3, image 4, text 2 = 9 tokens truncated to 7; sample 1: text 2, image 3, text 1 = 6
    m0 = llava_next.segment_mask([torch.zeros(3, 1), torch.zeros(4, 1), torch.zeros(2, 1)])
    m1 = llava_next.segment_mask([torch.zeros(2, 1), torch.zeros(3, 1), torch.zeros(1, 1)])
    am = torch.zeros(2, 7, dtype=torch.bool)
    am[0] = True
    if side == "left":
        am[1, 1:] = True
        expect1 = [0, 0, 0, 1, 1, 1, 0]
    else:
        am[1, :6] = True
        expect1 = [0, 0, 1, 1, 1, 0, 0]
    vm = llava_next.padded_visual_mask([m0, m1], am)
    assert vm[0].tolist() == [False, False, False, True, True, True, True]
    assert vm[1].int().tolist() == expect1
    with pytest.raises(ValueError, match=r"^masks: expected 2 .*modalities"):
        llava_next.padded_visual_mask([m0], am)


def test_publish_records_the_mask_and_prepares_an_attached_runner():
    fork = FakeFork()
    calls = []
    m = llava_next.segment_mask([torch.zeros(2, 1), torch.zeros(3, 1)])
    llava_next.publish_visual_mask(fork, [m], torch.ones(1, 5, dtype=torch.bool))  # not attached: no-op
    with llava_next.attach(fork, query_index=torch.tensor([4])) as session:
        session.runner = SimpleNamespace(prepare=lambda **kw: calls.append(kw), forward=lambda *a, **k: ("engine", a, k))
        llava_next.publish_visual_mask(fork, [m], torch.ones(1, 5, dtype=torch.bool))
        assert session.visual_tokens == [3] and session.sequence_lengths == [5]
        assert calls[0]["visual_mask"].tolist() == [[False, False, True, True, True]]
        assert calls[0]["query_index"].tolist() == [4]
        # P3 routes to the runner while attached ...
        assert llava_next.qwen2_forward(fork.inner, lambda *a, **k: "stock", 1, x=2) == ("engine", (1,), {"x": 2})
    # ... and to the stock forward otherwise
    assert llava_next.qwen2_forward(fork.inner, lambda *a, **k: ("stock", a, k), 1, x=2) == ("stock", (1,), {"x": 2})


def test_pruning_combines_attach_and_scene_context():
    fork = FakeFork(grid=3)
    hidden = torch.randn(2, 9, 8)
    with llava_next.pruning(fork, SeGPruner(tokens=2, important_ratio=1.0), grid=3) as session:
        merged, _, proj = fork.encode_and_merge(hidden)
        out = llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1])
        assert session.model is fork
    assert [o.shape[0] for o in out] == [3, 3]
    assert llava_next.select_image_tokens(fork, merged, split_sizes=[1, 1]) is merged  # context closed


def test_scene_context_raises_on_a_non_finite_pose_or_excludes_that_view():
    from shared.datasets import make_room_scene, prepare_views
    from shared.hosts.selection import scene_context
    from shared.methods import SeGPruner

    prep = prepare_views(make_room_scene(n_views=3, seed=1), size=384)
    prep.cam2world[1, 0, 3] = float("-inf")  # ScanNet marks lost tracking this way
    with pytest.raises(ValueError, match="^cam2world: view 1 has non-finite entries"):
        with scene_context(SeGPruner(16), prep):
            pass
    with scene_context(SeGPruner(16), prep, on_invalid_pose="exclude") as ctx:
        (geo,) = ctx.geometry
    assert not bool(geo.valid[1].any()) and bool(geo.valid[0].any()) and bool(geo.valid[2].any())
