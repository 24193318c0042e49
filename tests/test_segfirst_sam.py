"""SAM as a Seg-First mask source (shared.segfirst_sam) on tiny random SAMs of segment_anything's own classes.

References: ``segment_anything``'s own ``SamAutomaticMaskGenerator`` run as its README runs it (the
official library), SAM's ``ResizeLongestSide`` sizes worked out by hand, and hand-made decoder weights
for the no-mask case. Needs ``segment-anything`` and torchvision (``.venvs/yolo``, see
scripts/setup_test_envs.sh); elsewhere the file skips (fails with ``HOST_TESTS_REQUIRED=1``).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.hosts.upstream import unavailable

GEN = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(autouse=True)
def _needs_segment_anything():
    missing = [m for m in ("torchvision", "segment_anything") if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"the SAM mask source needs {missing} (.venvs/yolo: scripts/setup_test_envs.sh installs them)")


def image(h=48, w=64, seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def official(sam, img, **kw) -> np.ndarray:
    from segment_anything import SamAutomaticMaskGenerator

    anns = SamAutomaticMaskGenerator(sam, **kw).generate(img)
    return np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0,) + img.shape[:2], bool)


def capture_encoder(sam):
    """Forward hook on ``sam.image_encoder``: every call's (input, output)."""
    calls = []
    handle = sam.image_encoder.register_forward_hook(lambda _m, a, o: calls.append((a[0].detach(), o.detach())))
    return calls, handle


# --------------------------------------------------------------------------------- geometry
def test_sam_input_size_by_hand_and_as_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    from shared.segfirst_sam import sam_input_size

    # scale = 1024 / long side; int(side * scale + 0.5): 48*16 = 768; 37*20.48 = 757.76 -> 758; 427*1.6 = 683.2 -> 683
    assert sam_input_size(48, 64) == (768, 1024)
    assert sam_input_size(37, 50) == (758, 1024)
    assert sam_input_size(640, 427) == (1024, 683)
    for h, w in ((48, 64), (37, 50), (640, 427), (333, 500), (1, 1000), (1024, 1024)):
        assert sam_input_size(h, w) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    with pytest.raises(ValueError, match=r"^height: expected a positive int"):
        sam_input_size(0, 5)


def test_padded_input_size_reads_the_image_extent():
    from shared.segfirst_sam import padded_input_size

    x = torch.zeros(1, 3, 1024, 1024)
    x[0, 2, 757, 1023] = -0.01  # one nonzero value in the last row/column of a 758 x 1024 image
    x[0, 0, :758, :10] = 1.0
    assert padded_input_size(x) == (758, 1024)
    with pytest.raises(ValueError, match=r"^encoder_input: the SAM input is all zeros"):
        padded_input_size(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^encoder_input: expected one padded SAM input"):
        padded_input_size(torch.zeros(2, 3, 8, 8))


def test_padded_input_size_of_sams_own_preprocessing():
    """SamPredictor normalises and zero-pads; for every image size the extent is ResizeLongestSide's."""
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import padded_input_size, sam_input_size

    sam = tiny_sam(seed=0)
    from segment_anything import SamPredictor

    pred = SamPredictor(sam)
    calls, handle = capture_encoder(sam)
    try:
        for h, w in ((48, 64), (37, 50), (64, 40)):
            pred.set_image(image(h, w))
            assert padded_input_size(calls[-1][0]) == sam_input_size(h, w)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- standalone
def test_standalone_equals_the_official_generator():
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    sam = tiny_sam(seed=0)
    img = image()
    src = SamMaskSource(model=sam, **GEN)
    got = src(img)
    want = official(sam, img, **GEN)
    assert got.dtype == np.bool_ and got.shape == want.shape == (want.shape[0], 48, 64)
    assert want.shape[0] > 1 and len({m.tobytes() for m in want}) > 1  # several distinct masks: not vacuous
    assert int((got != want).sum()) == 0
    assert src.last_count == want.shape[0] and src.last_seconds > 0


def test_parameters_reach_the_generator():
    """min_mask_region_area and the thresholds are SamAutomaticMaskGenerator's own (same output)."""
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    sam = tiny_sam(seed=0)
    img = image(40, 56, seed=3)
    kw = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9,
              min_mask_region_area=200, points_per_batch=5)
    got = SamMaskSource(model=sam, **kw)(img)
    want = official(sam, img, **kw)
    assert got.shape == want.shape and int((got != want).sum()) == 0
    assert got.shape[0] != official(sam, img, **dict(kw, box_nms_thresh=1.0, min_mask_region_area=0)).shape[0]


# ------------------------------------------------------------------------- shared encoder
def test_shared_encoder_masks_equal_standalone_given_the_same_embeddings():
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import NoImageEncoder, SamMaskSource, padded_input_size

    sam = tiny_sam(seed=0)
    for h, w in ((48, 64), (37, 50)):
        img = image(h, w, seed=h)
        standalone = SamMaskSource(model=sam, **GEN)
        calls, handle = capture_encoder(sam)
        try:
            want = standalone(img)
        finally:
            handle.remove()
        assert len(calls) == 1 and want.shape[0] > 1
        enc_in, emb = calls[0]
        shared = SamMaskSource(model=sam, shared_encoder=True, **GEN)
        assert isinstance(shared.model.image_encoder, NoImageEncoder)
        assert not any(n.startswith("image_encoder") for n, _ in shared.model.named_parameters())
        counted, handle = capture_encoder(sam)
        try:
            shared.set_embeddings(emb, padded_input_size(enc_in))
            got = shared(img)
        finally:
            handle.remove()
        assert counted == []  # the shared path runs no image encoder
        assert got.shape == want.shape and int((got != want).sum()) == 0


def test_shared_encoder_refuses_without_or_with_foreign_embeddings():
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    sam = tiny_sam(seed=0)
    shared = SamMaskSource(model=sam, shared_encoder=True, **GEN)
    img = image()
    with pytest.raises(RuntimeError, match=r"^embeddings: the shared-encoder SAM source has no image embeddings"):
        shared(img)
    emb = torch.zeros(1, 32, 16, 16)
    shared.set_embeddings(emb, (758, 1024))  # the embeddings of a 37 x 50 image
    with pytest.raises(ValueError, match=r"^image: the original image is 48x64 \(SAM input 768x1024\), but the "
                                         r"embeddings were computed from a 758x1024 SAM input"):
        shared(img)
    with pytest.raises(RuntimeError, match=r"^embeddings: .*no image embeddings"):  # used once, then gone
        shared(img)
    with pytest.raises(ValueError, match=r"^embeddings: expected one image's SAM embeddings \(1, 32, 16, 16\)"):
        shared.set_embeddings(torch.zeros(1, 256, 64, 64), (768, 1024))
    with pytest.raises(ValueError, match=r"^input_size: expected \(h', w'\) with the long side 1024"):
        shared.set_embeddings(emb, (48, 64))
    with pytest.raises(RuntimeError, match=r"has no image encoder"):
        shared.model.image_encoder(torch.zeros(1, 3, 1024, 1024))
    standalone = SamMaskSource(model=sam, **GEN)
    with pytest.raises(ValueError, match=r"^shared_encoder: set_embeddings is for the shared-encoder mode"):
        standalone.set_embeddings(emb, (768, 1024))


def test_no_masks_gives_an_empty_stack_and_the_uniform_fallback():
    """Hand-made decoder: the IoU head predicts -1 for every mask, so pred_iou_thresh=0.5 drops all."""
    from tests.sam_tiny import tiny_sam

    from shared.methods.lvlm_csp_clustering import uniform_tokens
    from shared.segfirst import seg_first_select
    from shared.segfirst_sam import SamMaskSource

    sam = tiny_sam(seed=0)
    last = sam.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)
    img = image()
    src = SamMaskSource(model=sam, **dict(GEN, pred_iou_thresh=0.5))
    masks = src(img)
    assert masks.shape == (0, 48, 64) and masks.dtype == np.bool_ and src.last_count == 0
    sel = seg_first_select(img, src, 16, torch.Generator().manual_seed(0))
    assert sel.fallback_used and torch.equal(sel.indices, uniform_tokens(256, 16))


def test_parameters_are_validated_by_name():
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    sam = tiny_sam(seed=0)
    for name, bad, form in (("points_per_side", 0, "an int >= 1"), ("points_per_side", 2.0, "an int >= 1"),
                            ("points_per_batch", True, "an int >= 1"), ("pred_iou_thresh", 1.5, r"a float in \[0, 1\]"),
                            ("stability_score_thresh", -0.1, r"a float in \[0, 1\]"),
                            ("box_nms_thresh", 0.0, r"a float in \(0, 1\]"),
                            ("min_mask_region_area", -1, "an int >= 0")):
        with pytest.raises(ValueError, match=rf"^{name}: expected {form}, got"):
            SamMaskSource(model=sam, **{name: bad})
    with pytest.raises(ValueError, match=r"^checkpoint/model: give exactly one"):
        SamMaskSource()
    with pytest.raises(TypeError, match=r"^model: expected a segment_anything Sam"):
        SamMaskSource(model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"^shared_encoder: expected a bool"):
        SamMaskSource(model=sam, shared_encoder=1)
    with pytest.raises(ValueError, match=r"^model: a Sam without an image encoder can only run with shared_encoder=True"):
        SamMaskSource(model=tiny_sam(with_encoder=False))


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture
def tiny_types(monkeypatch):
    """Two tiny architectures registered as SAM types (as vit_b/l/h are): widths 16 and 24."""
    from tests.sam_tiny import tiny_type

    from shared import segfirst_sam

    monkeypatch.setitem(segfirst_sam.SAM_TYPES, "vit_tiny", tiny_type("vit_tiny", 16))
    monkeypatch.setitem(segfirst_sam.SAM_TYPES, "vit_tiny24", tiny_type("vit_tiny24", 24))


def test_checkpoint_standalone_and_shared(tmp_path, tiny_types):
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import NoImageEncoder, SamMaskSource

    sam = tiny_sam(seed=1)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    img = image(40, 30, seed=5)
    src = SamMaskSource(str(path), **GEN)
    assert src.sam_type == "vit_tiny"
    want = official(sam, img, **GEN)
    got = src(img)
    assert want.shape[0] > 1 and got.shape == want.shape and int((got != want).sum()) == 0

    shared = SamMaskSource(str(path), shared_encoder=True, **GEN)
    assert isinstance(shared.model.image_encoder, NoImageEncoder)
    shared.check_encoder(sam.image_encoder)  # the encoder the checkpoint holds
    bf16 = tiny_sam(seed=1).to(torch.bfloat16)  # a host keeping the frozen encoder in bf16 passes too
    shared.check_encoder(bf16.image_encoder)
    calls, handle = capture_encoder(sam)
    with torch.no_grad():
        from segment_anything import SamPredictor

        SamPredictor(sam).set_image(img)
    handle.remove()
    from shared.segfirst_sam import padded_input_size

    shared.set_embeddings(calls[0][1], padded_input_size(calls[0][0]))
    got = shared(img)
    assert got.shape == want.shape and int((got != want).sum()) == 0


def test_legacy_checkpoint_format_loads(tmp_path, tiny_types):
    """A pre-zip torch.save file cannot be memory-mapped: it is read whole, to the same weights."""
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import load_checkpoint

    state = tiny_sam(seed=1).state_dict()
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    got = load_checkpoint(str(path))
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_checkpoint_of_another_encoder_is_refused(tmp_path, tiny_types):
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam(seed=1).state_dict(), path)
    shared = SamMaskSource(str(path), shared_encoder=True)
    with pytest.raises(ValueError, match=r"^checkpoint: a vit_tiny SAM \(16-d, 2 blocks\), but the host's image encoder "
                                         r"is vit_tiny24 \(24-d, 2 blocks\)"):
        shared.check_encoder(tiny_sam(width=24, seed=1).image_encoder)
    with pytest.raises(ValueError, match=r"^checkpoint: its image encoder is not the host's \(\d+ of 196608 "):
        shared.check_encoder(tiny_sam(seed=2).image_encoder)  # same type, other weights
    with pytest.raises(ValueError, match=rf"^checkpoint: {path} is a vit_tiny SAM \(16-d, 2 blocks\), but "
                                         r"model_type='vit_tiny24'"):
        SamMaskSource(str(path), model_type="vit_tiny24")
    with pytest.raises(ValueError, match=r"^model_type: expected one of vit_b, vit_l, vit_h, vit_tiny, vit_tiny24"):
        SamMaskSource(str(path), model_type="vit_x")


def test_checkpoint_errors_name_the_checkpoint(tmp_path, tiny_types):
    from tests.sam_tiny import tiny_sam

    from shared.segfirst_sam import SamMaskSource

    with pytest.raises(ValueError, match=r"^checkpoint: no file at .*never downloads"):
        SamMaskSource(str(tmp_path / "absent.pth"))
    other = tmp_path / "llama.bin"
    torch.save({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=r"^checkpoint: .*llama.bin is not a SAM checkpoint \(no image_encoder, "
                                         r"prompt_encoder, mask_decoder weights"):
        SamMaskSource(str(other))
    pickled = tmp_path / "yolo.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, as ultralytics saves
    with pytest.raises(ValueError, match=r"^checkpoint: .*yolo.pt is not a plain SAM state dict"):
        SamMaskSource(str(pickled))
    wide = tmp_path / "wide.pth"
    torch.save(tiny_sam(width=8, seed=0).state_dict(), wide)
    with pytest.raises(ValueError, match=r"^checkpoint: .*wide.pth holds a SAM image encoder of width 8 and 2 blocks, "
                                         r"which is none of vit_b \(768-d, 12 blocks\)"):
        SamMaskSource(str(wide))
    broken = {k: v for k, v in tiny_sam(seed=0).state_dict().items() if not k.startswith("mask_decoder.iou_token")}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"^checkpoint: .*broken.pth does not fit the vit_tiny SAM architecture"):
        SamMaskSource(str(tmp_path / "broken.pth"))


def test_released_types_are_recognised_by_shape():
    """vit_b / vit_l / vit_h as segment_anything.build_sam defines them (width, blocks), from shapes alone."""
    from shared.segfirst_sam import checkpoint_type

    for name, width, depth in (("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)):
        state = {"image_encoder.patch_embed.proj.weight": torch.zeros(width, 3, 16, 16)}
        state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(depth)})
        assert checkpoint_type(state).name == name
    vit_b = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    vit_b.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    with pytest.raises(ValueError, match=r"^checkpoint: x.pth is a vit_b SAM \(768-d, 12 blocks\), but model_type='vit_h'"):
        checkpoint_type(vit_b, "vit_h", "x.pth")


def test_mask_source_from_spec(tmp_path, tiny_types):
    from tests.sam_tiny import tiny_sam

    from shared.segfirst import mask_source_from_spec, parse_mask_spec
    from shared.segfirst_sam import SamMaskSource

    path = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam(seed=1).state_dict(), path)
    assert parse_mask_spec("sam-shared:/a:b.pth") == ("sam-shared", "/a:b.pth")
    for bad in ("sam", "detr:x.pt", "sam:", 3):
        with pytest.raises(ValueError, match=r"^csp_masks: expected KIND:PATH with KIND one of yolo, sam, sam-shared"):
            parse_mask_spec(bad)
    src = mask_source_from_spec(f"sam:{path}", points_per_side=2)
    assert isinstance(src, SamMaskSource) and not src.shared_encoder and src.points_per_side == 2
    src = mask_source_from_spec(f"sam-shared:{path}", pred_iou_thresh=0.5)
    assert src.shared_encoder and src.wants_image_embeddings and src.pred_iou_thresh == 0.5
    with pytest.raises(ValueError, match=r"^mask_args: 'conf' is not a parameter of the sam-shared mask source; "
                                         r"its parameters: box_nms_thresh, min_mask_region_area, model_type, "
                                         r"points_per_batch, points_per_side, pred_iou_thresh, stability_score_thresh"):
        mask_source_from_spec(f"sam-shared:{path}", conf=0.3)
    with pytest.raises(ValueError, match=r"^mask_args: 'points_per_side' is not a parameter of the yolo mask source; "
                                         r"its parameters: conf, imgsz, iou"):
        mask_source_from_spec("yolo:x.pt", points_per_side=3)
