"""Seg-First masks (shared.segfirst): CLIP crop geometry, mask → grid by hand, mask sources, YOLO end to end."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.methods.lvlm_csp_clustering import seg_first_tokens, uniform_tokens
from shared.segfirst import (
    CallableMaskSource,
    YoloMaskSource,
    clip_crop_geometry,
    masks_to_grid,
    seg_first_select,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD_SIZES = [(427, 640), (640, 427), (333, 500), (224, 224), (225, 1000), (1000, 225), (7, 9), (481, 321), (375, 500)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ geometry
def test_crop_geometry_hand_computed():
    g = clip_crop_geometry(427, 640)  # 224·640/427 = 335.7 -> 335; left = (335 - 224)//2 = 55
    assert (g.resized_height, g.resized_width, g.top, g.left) == (224, 335, 0, 55)
    g = clip_crop_geometry(640, 427, 336)  # 336·640/427 = 503.6 -> 503; top = (503 - 336)//2 = 83
    assert (g.resized_height, g.resized_width, g.top, g.left) == (503, 336, 83, 0)
    g = clip_crop_geometry(224, 224)
    assert (g.resized_height, g.resized_width, g.top, g.left) == (224, 224, 0, 0)


_TF_SCRIPT = r"""
import json, sys
import numpy as np
from transformers.image_transforms import center_crop, get_resize_output_image_size
out = []
for h, w, s in json.loads(sys.argv[1]):
    rh, rw = get_resize_output_image_size(np.zeros((h, w, 3), np.uint8), size=s, default_to_square=False)
    yy, xx = np.meshgrid(np.arange(rh, dtype=np.float64), np.arange(rw, dtype=np.float64), indexing="ij")
    crop = center_crop(np.stack([yy, xx, np.zeros_like(yy)]), (s, s))  # channels first, as the processor
    out.append([int(rh), int(rw), int(crop[0, 0, 0]), int(crop[1, 0, 0]), list(crop.shape)])
print(json.dumps(out))
"""


def _cases():
    return [[h, w, s] for (h, w) in ODD_SIZES for s in (224, 336)]


def _check_against(result):
    for (h, w, s), (rh, rw, top, left, shape) in zip(_cases(), result):
        g = clip_crop_geometry(h, w, s)
        assert (g.resized_height, g.resized_width, g.top, g.left) == (rh, rw, top, left), (h, w, s)
        assert shape == [3, s, s]


def test_crop_geometry_matches_transformers_4_31():
    tf = os.path.join(ROOT, ".venvs", "tf-4.31.0")
    if not os.path.isdir(os.path.join(tf, "transformers")):
        pytest.skip(".venvs/tf-4.31.0 not built (scripts/setup_test_envs.sh)")
    env = dict(os.environ, PYTHONPATH=tf)
    res = subprocess.run(
        [sys.executable, "-c", _TF_SCRIPT, json.dumps(_cases())], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    _check_against(json.loads(res.stdout.strip().splitlines()[-1]))


def test_crop_geometry_matches_installed_transformers():
    pytest.importorskip("transformers", reason="transformers not on the path")
    res = subprocess.run(
        [sys.executable, "-c", _TF_SCRIPT, json.dumps(_cases())], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    _check_against(json.loads(res.stdout.strip().splitlines()[-1]))


# -------------------------------------------------------------------------------- mask -> grid
def rect(h, w, r0, r1, c0, c1):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def tokens(rows, cols, g=16):
    return sorted(r * g + c for r in rows for c in cols)


def test_masks_to_grid_hand_computed_landscape():
    # 448×672 → resized exactly 224×336 (factor ½), left = (336−224)//2 = 56, top = 0.
    # Nearest (centre-aligned): resized (y, x) samples original (2y+1, 2x+1).
    h, w = 448, 672
    masks = np.stack(
        [
            rect(h, w, 56, 112, 168, 252),  # resized rows 28-55, cols 84-125 → crop cols 28-69
            rect(h, w, 56, 112, 168, 210),  # crop cols 28-48: patch col 3 covered 7/14 = 0.5
            rect(h, w, 0, 448, 0, 100),  # resized cols <= 49 < 56: outside the crop
            rect(h, w, 57, 58, 169, 170),  # one sampled pixel → crop (28, 28), patch (2, 2)
            rect(h, w, 56, 57, 168, 169),  # one pixel never sampled (even coordinates)
        ]
    )
    gm = masks_to_grid(masks)
    assert gm.coverage.shape == (5, 16, 16) and gm.grid == 16 and gm.num_tokens == 256
    assert gm.areas.tolist() == [28 * 42, 28 * 21, 0, 1, 0]
    assert gm.token_sets[0].tolist() == tokens([2, 3], [2, 3, 4])
    assert gm.token_sets[1].tolist() == tokens([2, 3], [2, 3])  # coverage 0.5 >= 0.5
    assert gm.coverage[1, 2, 3].item() == 0.5 and gm.coverage[1, 2, 2].item() == 1.0
    assert gm.token_sets[2].tolist() == [] and gm.token_sets[4].tolist() == []
    assert gm.token_sets[3].tolist() == [2 * 16 + 2]  # coverage 1/196 < 0.5: argmax patch
    assert gm.coverage[3].sum().item() == pytest.approx(1 / 196)
    strict = masks_to_grid(masks, threshold=0.51)
    assert strict.token_sets[1].tolist() == tokens([2, 3], [2])
    # portrait: the transposed image gives the transposed grid
    gt = masks_to_grid(np.ascontiguousarray(masks.transpose(0, 2, 1)))
    assert gt.areas.tolist() == gm.areas.tolist()
    assert torch.equal(gt.coverage, gm.coverage.transpose(1, 2))
    assert gt.token_sets[0].tolist() == tokens([2, 3, 4], [2, 3])


def test_masks_to_grid_336_gives_24x24():
    h, w = 336, 504  # scale 1: resized 336×504, left = 84
    masks = np.stack([rect(h, w, 0, 14, 84, 98), rect(h, w, 322, 336, 406, 420)])
    gm = masks_to_grid(masks, size=336)
    assert gm.coverage.shape == (2, 24, 24) and gm.num_tokens == 576
    assert gm.token_sets[0].tolist() == [0] and gm.token_sets[1].tolist() == [575]
    assert gm.areas.tolist() == [196, 196]


def reference_grid(masks: np.ndarray, size: int, patch: int, thr: float):
    """Independent reference: torch's nearest-exact resize of the whole mask, numpy crop and block mean."""
    m, h, w = masks.shape
    short, long = min(h, w), max(h, w)
    nl = int(size * long / short)
    rh, rw = (nl, size) if w <= h else (size, nl)
    up = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(rh, rw), mode="nearest-exact")[:, 0]
    top, left = (rh - size) // 2, (rw - size) // 2
    crop = up[:, top : top + size, left : left + size].numpy()
    g = size // patch
    cov = crop.reshape(m, g, patch, g, patch).mean(axis=(2, 4))
    return crop.reshape(m, -1).sum(1), cov, [np.flatnonzero(c.reshape(-1) >= thr) for c in cov]


@pytest.mark.parametrize("hw", ODD_SIZES)
@pytest.mark.parametrize("size", [224, 336])
def test_masks_to_grid_matches_reference(hw, size):
    h, w = hw
    rng = np.random.default_rng(h * 7 + w)
    masks = []
    for _ in range(4):  # random rectangles, some partly outside the crop
        r0, c0 = rng.integers(0, h), rng.integers(0, w)
        masks.append(rect(h, w, r0, r0 + rng.integers(1, h + 1), c0, c0 + rng.integers(1, w + 1)))
    masks.append(rng.random((h, w)) < 0.3)  # noise
    masks = np.stack(masks)
    gm = masks_to_grid(masks.astype(np.uint8), size=size)
    areas, cov, sets = reference_grid(masks, size, 14, 0.5)
    assert gm.areas.tolist() == [int(a) for a in areas]
    np.testing.assert_allclose(gm.coverage.numpy(), cov, rtol=0, atol=1e-6)
    for i, t in enumerate(gm.token_sets):
        if len(sets[i]) == 0 and areas[i] > 0:
            assert t.tolist() == [int(np.argmax(cov[i].reshape(-1)))]
        else:
            assert t.tolist() == sets[i].tolist()


def test_masks_to_grid_inputs():
    m = rect(50, 60, 10, 40, 10, 50)
    a = masks_to_grid(m[None])
    assert torch.equal(masks_to_grid(torch.from_numpy(m[None])).coverage, a.coverage)
    assert torch.equal(masks_to_grid(m[None].astype(np.uint8) * 255).coverage, a.coverage)  # nonzero = inside
    assert torch.equal(masks_to_grid(m[None].astype(np.float32)).coverage, a.coverage)
    empty = masks_to_grid(np.zeros((0, 50, 60), bool))
    assert empty.token_sets == [] and empty.areas.shape == (0,) and empty.coverage.shape == (0, 16, 16)
    with pytest.raises(ValueError, match="^masks:"):
        masks_to_grid(m)  # (H, W)
    with pytest.raises(ValueError, match="^masks:"):
        masks_to_grid(m[None, None])
    with pytest.raises(ValueError, match="^masks:"):
        masks_to_grid(np.full((1, 5, 5), 0.3, np.float32))
    with pytest.raises(TypeError, match="^masks:"):
        masks_to_grid([[[1]]])
    with pytest.raises(ValueError, match="^patch:"):
        masks_to_grid(m[None], size=224, patch=15)
    with pytest.raises(ValueError, match="^threshold:"):
        masks_to_grid(m[None], threshold=0.0)
    with pytest.raises(ValueError, match="^size:"):
        masks_to_grid(m[None], size=0)
    with pytest.raises(ValueError, match="^height:"):
        clip_crop_geometry(0, 10)


# ------------------------------------------------------------------------------------- sources
def image(h=300, w=400, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_callable_source_and_pipeline():
    img = image()
    masks = np.stack([rect(300, 400, 0, 150, 50, 350), rect(300, 400, 200, 300, 100, 200)])
    seen = []

    def fn(x):
        seen.append(x)
        return torch.from_numpy(masks)

    src = CallableMaskSource(fn)
    out = src(img)
    assert out.dtype == bool and np.array_equal(out, masks) and seen[0] is img
    sel = seg_first_select(img, src, 16, gen(4))
    gm = masks_to_grid(masks)
    ref = seg_first_tokens(gm.token_sets, gm.areas, 16, gen(4), n=256)
    assert torch.equal(sel.indices, ref.indices) and sel.quotas.tolist() == ref.quotas.tolist()
    assert not sel.fallback_used and sel.quotas.sum().item() >= 16 - 1
    exact = seg_first_select(img, src, 32, gen(4), budget="exact")
    assert exact.count == 32
    sel336 = seg_first_select(img, src, 64, gen(4), size=336)
    assert int(sel336.indices.max()) < 576

    none = CallableMaskSource(lambda x: np.zeros((0,) + x.shape[:2], bool))
    fb = seg_first_select(img, none, 16, gen())
    assert fb.fallback_used and fb.count == 16 and torch.equal(fb.indices, uniform_tokens(256, 16))


def test_source_errors():
    img = image()
    with pytest.raises(ValueError, match="^masks:"):
        CallableMaskSource(lambda x: np.zeros((1, 10, 10), bool))(img)
    with pytest.raises(ValueError, match="^masks:"):
        seg_first_select(img, lambda x: np.zeros((300, 400), bool), 16, gen())
    with pytest.raises(TypeError, match="^fn:"):
        CallableMaskSource(3)
    with pytest.raises(TypeError, match="^image:"):
        seg_first_select(img.astype(np.float32), CallableMaskSource(lambda x: x), 16, gen())
    with pytest.raises(ValueError, match="^image:"):
        seg_first_select(img[:, :, :2], CallableMaskSource(lambda x: x), 16, gen())
    with pytest.raises(TypeError, match="^source:"):
        seg_first_select(img, None, 16, gen())
    with pytest.raises(ValueError, match="^nc:"):
        seg_first_select(img, lambda x: np.zeros((0, 300, 400), bool), 257, gen())


def test_yolo_source_checks_before_importing(tmp_path):
    with pytest.raises(ValueError, match="^weights:"):
        YoloMaskSource(str(tmp_path / "yolo11n-seg.pt"))
    with pytest.raises(ValueError, match="^weights/model:"):
        YoloMaskSource()
    with pytest.raises(ValueError, match="^conf:"):
        YoloMaskSource(model=lambda *a, **k: None, conf=2.0)


def test_yolo_missing_package_message(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"ultralytics>=8\.3.*AGPL-3\.0"):
        YoloMaskSource.from_yaml()
    w = tmp_path / "w.pt"
    w.write_bytes(b"x")
    with pytest.raises(ImportError, match=r"ultralytics>=8\.3"):
        YoloMaskSource(str(w))


class FakeYolo:
    """Records what it is called with; returns a result shaped like ultralytics' Results."""

    def __init__(self, data):
        self.data, self.calls = data, []

    def __call__(self, source, **kwargs):
        self.calls.append((source, kwargs))
        masks = None if self.data is None else SimpleNamespace(data=self.data)
        return [SimpleNamespace(masks=masks)]


def test_yolo_wrapper_contract():
    img = image(30, 40)
    fake = FakeYolo(None)
    src = YoloMaskSource(model=fake, imgsz=320, conf=0.1, iou=0.5)
    out = src(img)
    assert out.shape == (0, 30, 40) and out.dtype == bool and src.last_count == 0 and src.last_seconds >= 0
    arr, kw = fake.calls[0]
    assert np.array_equal(arr, img[:, :, ::-1])  # ultralytics reads numpy arrays as BGR
    assert kw == dict(imgsz=320, conf=0.1, iou=0.5, retina_masks=True, verbose=False, device="cpu")
    m = torch.zeros(2, 30, 40)
    m[0, :5] = 1.0
    out = YoloMaskSource(model=FakeYolo(m))(img)
    assert out.dtype == bool and out.sum() == 5 * 40 and not out[1].any()
    out = YoloMaskSource(model=FakeYolo(m.to(torch.uint8)))(img)
    assert out.sum() == 5 * 40
    with pytest.raises(RuntimeError, match="original size"):
        YoloMaskSource(model=FakeYolo(torch.zeros(1, 32, 32)))(img)


# ------------------------------------------------------------------------- real ultralytics model
@pytest.fixture
def offline_ultralytics(monkeypatch, tmp_path):
    """ultralytics with every non-local connection recorded and refused, config under tmp_path."""
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "cfg"))
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address, *a):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address, *a)
        attempts.append(address)
        raise OSError(f"network disabled in tests: {address}")

    def getaddrinfo(host, *a, **k):
        if host in ("localhost", "127.0.0.1", "::1", None):
            return real_getaddrinfo(host, *a, **k)
        attempts.append(host)
        raise OSError(f"network disabled in tests: {host}")

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        import ultralytics
    except ImportError as e:  # also PackageNotFoundError: ultralytics reads torchvision's metadata
        pytest.skip(f"optional ultralytics>=8.3 (AGPL-3.0) not usable here ({type(e).__name__}: {e}); "
                    f"pip install 'ultralytics>=8.3' with a torchvision matching torch")
    try:
        import torchvision  # noqa: F401  (ultralytics imports it for NMS)
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"torchvision cannot load beside this torch ({type(e).__name__}: {e})")
    yield ultralytics
    assert attempts == [], f"ultralytics tried to reach the network: {attempts}"


def test_yolo_untrained_end_to_end(offline_ultralytics, tmp_path):
    torch.manual_seed(0)
    src = YoloMaskSource.from_yaml("yolo11n-seg.yaml", imgsz=320)
    img = image(427, 640, seed=1)
    seen = []

    def recording(source):
        def call(x):
            seen.append(source(x))
            return seen[-1]

        return call

    sel = seg_first_select(img, recording(src), 16, gen())
    masks = seen[-1]
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (427, 640)
    assert src.last_count == masks.shape[0] and src.last_seconds > 0
    if not masks.any():  # what an untrained head gives at conf 0.25
        assert sel.fallback_used and sel.count == 16 and torch.equal(sel.indices, uniform_tokens(256, 16))
    # an untrained head scores ~1e-5 per class: a tiny conf lets instances through
    low = YoloMaskSource(model=src.model, imgsz=320, conf=1e-6)
    sel = seg_first_select(img, recording(low), 16, gen(1))
    m = seen[-1]
    assert m.shape[1:] == (427, 640) and m.shape[0] == low.last_count
    assert m.shape[0] > 0, "a seeded untrained yolo11n-seg keeps instances at conf=1e-6"
    gm = masks_to_grid(m)
    ref = seg_first_tokens(gm.token_sets, gm.areas, 16, gen(1), n=256)
    assert torch.equal(sel.indices, ref.indices) and sel.fallback_used == ref.fallback_used
    assert sel.fallback_used == (int(gm.areas.sum()) == 0)
    # weights from a local file: save the untrained model and load it back through the path
    path = tmp_path / "untrained-seg.pt"
    src.model.save(str(path))
    again = YoloMaskSource(str(path), imgsz=320)
    assert again(img).shape[1:] == (427, 640)
    assert not os.path.exists(os.path.join(ROOT, "yolo11n-seg.pt"))
