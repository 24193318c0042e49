"""The method × host matrix: the README's table is the command's output, and on the native hosts
(transformers 5.x, tiny models of the real classes) every ✔ cell runs — keeping everything equals the
unpruned model bit for bit, a pruning config keeps what its schedule says — and every ✘ cell is
refused naming the need. The fork hosts' cells run on their real patched code in
``tests/hosts/test_lisa_real.py`` (LISA, transformers 4.31), ``tests/hosts/test_llava_next_fork.py``
(LLaVA-NeXT, 4.40), ``tests/hosts/test_chat_scene_real.py`` (Chat-Scene, 4.39.3) and
``tests/hosts/test_llava_3d_fork.py::test_matrix_cell_on_the_fork`` (LLaVA-3D, 4.37.2; it skips in CI, which has
no LLaVA-3D source: no snapshot is shared)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.apps import matrix

ROOT = Path(__file__).resolve().parents[1]


def test_readme_shows_the_generated_matrix():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- matrix: python -m shared.apps.matrix -->", "<!-- /matrix -->"
    assert start in text and end in text
    shown = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == matrix.table()


def test_every_registered_method_has_a_row():
    from shared import available_methods

    assert {m.name for _, m in matrix.ROWS} == set(available_methods())


transformers = pytest.importorskip("transformers")
NATIVE = int(transformers.__version__.split(".")[0]) >= 5


def _llava():
    from .test_native_hf import IMG, SEG_ID, _tiny, _with_seg

    model, ids, px = _tiny()
    return model, dict(input_ids=_with_seg(ids), pixel_values=px), {"guidance_token_id": SEG_ID}, int((ids == IMG).sum())


def _onevision():
    from shared.hosts.selection import geometry_from_views

    from .test_onevision_native import GRID, inputs_for, scene_views, tiny_ov

    model = tiny_ov()
    views = scene_views(2, seed=7)
    inputs = inputs_for(views, seed=7)
    ids = inputs["input_ids"].clone()
    ids[0, -3] = 5  # a guidance token after the images
    inputs["input_ids"] = ids
    return model, inputs, {"views": [geometry_from_views(views, grid=GRID)], "guidance_token_id": 5}, 2 * (GRID ** 2 + 1)


HOSTS = {"hf_llava": _llava, "hf_onevision": _onevision}


def _keep_everything(label, method, n, host, layers):
    """The row's method configured to keep every visual token (None: the method cannot)."""
    from dataclasses import replace

    if label == "adatoken3d":
        return matrix.adatoken_keep_all(layers)
    if label.startswith("fastv") or label == "random":
        return replace(method, keep=None, keep_ratio=1.0)
    if label.startswith("pdrop"):
        return replace(method, ratio=1.0)
    if label.startswith("lvlm_csp"):
        return replace(method, cluster_tokens=n, prune_tokens=n)
    if label == "segpruner":
        return replace(method, tokens=n // 2 - 1, important_ratio=1.0)  # every grid token of each view
    return None


def _tiny_sizes(label, method, layers):
    """The row's method at sizes a 16-patch image allows (AdaToken-3D fitted for the host's ``layers``)."""
    from dataclasses import replace

    if label == "adatoken3d":
        return matrix.adatoken_row(layers)
    if label.startswith("prumerge"):
        return replace(method, adaptive=False, reduction_ratio=0.25, neighbours=4)
    if label == "visionzip":
        return type(method)(dominant=6, contextual=2)
    if label == "segpruner":
        return replace(method, tokens=5, important_ratio=0.4)
    return method


@pytest.mark.skipif(not NATIVE, reason="the native hosts are transformers 5.x models")
@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("label", [label for label, _ in matrix.ROWS])
def test_cell(host, label):
    import shared
    from shared.needs import MissingNeed

    method = dict(matrix.ROWS)[label]
    cell = matrix.cell(method, host)
    model, inputs, options, n = HOSTS[host]()
    if cell.startswith("✘"):
        need = cell[2:].split(",")[0]
        with pytest.raises(MissingNeed, match=rf"^method: {method.name} needs .*'{need}'.*host '{host}'"):
            with shared.prune(model, method, **options):
                pass
        return
    if "grid_masks=" in cell:
        from shared.segfirst import masks_to_grid

        options["grid_masks"] = [masks_to_grid(torch.ones(1, 60, 80, dtype=torch.bool), size=56, patch=14)]
    layers = getattr(model.config, "text_config", model.config).num_hidden_layers
    method = _tiny_sizes(label, method, layers)
    full = _keep_everything(label, method, n, host, layers)
    with torch.no_grad():
        stock = model(**inputs).logits
        if full is not None:
            with shared.prune(model, full, **options) as session:
                out = model(**inputs).logits
            assert torch.equal(out, stock), f"{label} keeping everything differs from the unpruned {host}"
            assert session.last.stats.visual[0].tolist() == [n] * len(session.last.stats.visual[0])
        with shared.prune(model, method, **options) as session:
            model(**inputs)
    vis = session.last.stats.visual[0].tolist()
    layers = len(vis)
    if getattr(method, "stage", "llm") == "llm":
        clustered = vis[0] if label.startswith("lvlm_csp") else None
        assert vis == method.schedule(n, layers, clustered) if clustered else vis == method.schedule(n, layers)
    else:
        assert vis == [vis[0]] * layers and vis[0] < n and session.last.stats.visual_tokens.tolist() == [n]
