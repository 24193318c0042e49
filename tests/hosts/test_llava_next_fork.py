"""SeGPruner through the real patched LLaVA-NeXT fork, with scene geometry (transformers 4.40).

Upstream code path: ``tests/hosts/upstream.py`` materialises LLaVA-NeXT at its pin (submodule, else
the ../shared/upstream snapshot) with ``patches/LLaVA-NeXT`` applied, and these tests import its
``llava`` package (``LLAVA_STRICT_IMPORT=1``: a broken patch raises instead of being swallowed).
``generate`` runs the fork's ``prepare_inputs_labels_for_multimodal`` with the P1/P2/P3 calls.

Each test runs ``per_view`` or ``per_scene`` at important_ratio r in {0, 0.25} (r = 0: every token
from the geometry-aware farthest-point sampler) on three views of the synthetic RGB-D room passed
as ``PreparedViews``, and checks: the kept tokens equal ``SeGPruner.select`` on saliency, features
and centroids computed here without the glue (``llava_next_build``), and the decoder's prefill
input is the text, the kept projector rows and one newline per view. Also runs
``tests/fixtures/llava_next/fork_check.py`` (r = 1, FastV through P3, left padding) in-process.

Run: ``PYTHONPATH=.venvs/tf-4.40.2 .venvs/base/bin/python -m pytest tests/hosts/test_llava_next_fork.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from . import upstream

VIEWS = 3


@dataclass
class Env:
    nb: Any  # llava_next_build
    fork_check: Any
    model: Any
    scene: Any
    ids: torch.Tensor
    saliency: torch.Tensor
    features: torch.Tensor
    centroids: torch.Tensor
    valid: torch.Tensor


@pytest.fixture(scope="module")
def env():
    import importlib.util

    import transformers

    if not transformers.__version__.startswith("4.40."):
        upstream.unavailable(f"the LLaVA-NeXT fork runs on transformers 4.40, this is {transformers.__version__} "
                             "(PYTHONPATH=.venvs/tf-4.40.2 .venvs/base/bin/python -m pytest ...)")
    if importlib.util.find_spec("einops") is None:
        upstream.unavailable("LLaVA-NeXT's model code imports einops (scripts/setup_test_envs.sh installs it)")
    tree = upstream.tree_or_skip("LLaVA-NeXT")
    from . import llava_next_build as nb

    fc = nb.import_fork(tree)
    model = fc.tiny_fork()
    sc = nb.scene(VIEWS)
    ids = fc.prompt(VIEWS, torch.Generator().manual_seed(0))
    sal, feats = nb.tower_by_hand(model, sc.images)
    cent, valid = nb.centroids_by_hand(sc.prep)
    return Env(nb, fc, model, sc, ids, sal, feats, cent, valid)


def test_the_fork_is_the_patched_upstream(env):
    import llava.model.llava_arch as arch

    tree = upstream.patched_tree("LLaVA-NeXT")
    assert arch.__file__ == str(tree.path / "llava" / "model" / "llava_arch.py")
    assert type(env.model).__module__ == "llava.model.language_model.llava_qwen"
    src = (tree.path / "llava" / "model" / "llava_arch.py").read_text()
    assert "pruner_glue.select_image_tokens(" in src and "pruner_glue.publish_visual_mask(" in src
    assert "pruner_glue" not in tree.stock_file("llava/model/llava_arch.py")
    assert len(tree.patches) == 4


def test_scene_geometry_is_usable(env):
    """The canvas has padding rows without depth (invalid tokens) and enough valid ones."""
    per_view = env.valid.sum(1).tolist()
    assert all(200 < n < 729 for n in per_view), per_view


@pytest.mark.parametrize("r", [0.0, 0.25])
@pytest.mark.parametrize("mode,tokens", [("per_view", 40), ("per_scene", 90)])
def test_segpruner_keeps_what_select_picks_on_independent_inputs(env, mode, tokens, r):
    import shared
    from shared.methods.segpruner import SeGPruner

    nb, model = env.nb, env.model
    pruner = SeGPruner(tokens=tokens, important_ratio=r, mode=mode)
    cap = nb.DecoderInputs(model)
    try:
        with torch.no_grad(), shared.prune(model, pruner, host="llava_next", views=[env.scene.prep]) as sess:
            model.generate(env.ids, images=env.scene.images, image_sizes=[(384, 384)] * VIEWS,
                           modalities=["image"], max_new_tokens=1, do_sample=False)
    finally:
        cap.close()
    (record,) = sess.records
    keep = record.pre_llm[0]["keep"]
    want = pruner.select(env.saliency, env.features, env.centroids, env.valid)
    assert keep.shape == (VIEWS, 729)
    assert int((keep != want).sum()) == 0, f"{int((keep != want).sum())} of {VIEWS} x 729 tokens differ"
    if mode == "per_view":
        assert record.pre_llm[0]["per_view"] == [tokens] * VIEWS
    else:
        assert int(keep.sum()) == tokens
    assert record.stats.visual[0, 0] == int(keep.sum()) + VIEWS  # kept tokens + one newline per view
    assert record.stats.visual_tokens.tolist() == [VIEWS * 730]
    with torch.no_grad():
        expect = nb.llm_input_by_hand(model, env.ids, env.features, want)
    got = cap.embeds[0]
    assert got.shape == expect.shape
    assert torch.allclose(got, expect, atol=1e-6, rtol=0)
    # the geometry reached the selector: without it (all centroids at one point) the picks differ
    flat = pruner.select(env.saliency, env.features, torch.zeros_like(env.centroids), env.valid)
    assert int((flat != keep).sum()) > 0
    if r == 0:  # every token comes from the sampler, which only takes tokens with depth
        assert not bool((keep & ~env.valid).any())


def test_fork_check_script_runs_in_process(env, capsys):
    """tests/fixtures/llava_next/fork_check.py: r = 1 equals the stock generation, kept projector
    rows reach the LLM, FastV through P3 (alone and after selection), left padding."""
    env.fork_check.main()
    assert "fork check OK" in capsys.readouterr().out


def _fork_method(label, method, n, layers):
    """A matrix row's method at the fork's sizes and ``layers`` decoder layers: (pruning config,
    keep-everything config or None)."""
    from dataclasses import replace

    from shared.apps import matrix

    if label == "adatoken3d":
        return matrix.adatoken_row(layers), matrix.adatoken_keep_all(layers)
    if label.startswith("fastv") or label == "random":
        return method, replace(method, keep=None, keep_ratio=1.0)
    if label.startswith("pdrop"):
        return method, replace(method, ratio=1.0)
    if label.startswith("lvlm_csp"):
        return replace(method, cluster_tokens=300, prune_tokens=40), replace(method, cluster_tokens=n, prune_tokens=n)
    if label == "segpruner":
        return replace(method, tokens=40, important_ratio=0.25), replace(method, tokens=729, important_ratio=1.0)
    return method, None


@pytest.mark.parametrize("label", [label for label, _ in __import__("shared.apps.matrix", fromlist=["ROWS"]).ROWS])
def test_matrix_cell_on_the_fork(env, label):
    """Each row of ``python -m shared.apps.matrix`` on the real fork: a ✔ cell keeping everything generates
    what the unpruned fork generates and a pruning config follows its schedule; a ✘ cell is refused
    naming the need."""
    import shared
    from shared.apps import matrix
    from shared.needs import MissingNeed

    method = dict(matrix.ROWS)[label]
    cell = matrix.cell(method, "llava_next")
    model, n = env.model, VIEWS * 730
    kw = dict(images=env.scene.images, image_sizes=[(384, 384)] * VIEWS, modalities=["image"], do_sample=False)
    opts = {"views": [env.scene.prep]}
    if cell.startswith("✘"):
        need = cell[2:].split(",")[0]
        with pytest.raises(MissingNeed, match=rf"^method: {method.name} needs .*'{need}'.*host 'llava_next'"):
            with shared.prune(model, method, **opts):
                pass
        return
    prune_cfg, full = _fork_method(label, method, n, model.config.num_hidden_layers)
    with torch.no_grad():
        stock = model.generate(env.ids, max_new_tokens=3, **kw)
        with shared.prune(model, full, **opts) as session:
            out = model.generate(env.ids, max_new_tokens=3, **kw)
        assert torch.equal(out, stock), f"{label}: keeping everything changed the generation"
        with shared.prune(model, prune_cfg, **opts) as session:
            model.generate(env.ids, max_new_tokens=2, **kw)
    vis = session.last.stats.visual[0].tolist()
    if prune_cfg.stage == "llm":
        assert vis == (prune_cfg.schedule(n, len(vis), vis[0]) if label.startswith("lvlm_csp")
                       else prune_cfg.schedule(n, len(vis)))
    else:
        assert vis == [VIEWS * 41] * len(vis)  # 40 kept grid tokens + a newline per view
