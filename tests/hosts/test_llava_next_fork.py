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
    from shared.hosts import llava_next
    from shared.hosts.selection import scene_context
    from shared.methods.segpruner import SeGPruner

    nb, model = env.nb, env.model
    pruner = SeGPruner(tokens=tokens, important_ratio=r, mode=mode)
    cap = nb.DecoderInputs(model)
    try:
        with torch.no_grad(), llava_next.attach(model) as sess, scene_context(pruner, views=env.scene.prep) as ctx:
            model.generate(env.ids, images=env.scene.images, image_sizes=[(384, 384)] * VIEWS,
                           modalities=["image"], max_new_tokens=1, do_sample=False)
    finally:
        cap.close()
    (rec,) = ctx.records
    want = pruner.select(env.saliency, env.features, env.centroids, env.valid)
    assert rec.keep.shape == (VIEWS, 729)
    assert int((rec.keep != want).sum()) == 0, f"{int((rec.keep != want).sum())} of {VIEWS} x 729 tokens differ"
    if mode == "per_view":
        assert rec.per_view == [tokens] * VIEWS
    else:
        assert rec.grid_tokens == tokens
    assert sess.visual_tokens == [rec.grid_tokens + VIEWS]  # kept tokens + one newline per view
    with torch.no_grad():
        expect = nb.llm_input_by_hand(model, env.ids, env.features, want)
    got = cap.embeds[0]
    assert got.shape == expect.shape
    assert torch.allclose(got, expect, atol=1e-6, rtol=0)
    # the geometry reached the selector: without it (all centroids at one point) the picks differ
    flat = pruner.select(env.saliency, env.features, torch.zeros_like(env.centroids), env.valid)
    assert int((flat != rec.keep).sum()) > 0
    if r == 0:  # every token comes from the sampler, which only takes tokens with depth
        assert not bool((rec.keep & ~env.valid).any())


def test_fork_check_script_runs_in_process(env, capsys):
    """tests/fixtures/llava_next/fork_check.py: r = 1 equals the stock generation, kept projector
    rows reach the LLM, FastV through P3 (alone and after selection), left padding."""
    env.fork_check.main()
    assert "fork check OK" in capsys.readouterr().out
