"""The real patched LISA (tiny random weights) through the eval driver, every method it offers.

Upstream code path: ``tests/hosts/upstream.py`` materialises LISA at its pin (submodule, else the
snapshot in ../shared/upstream) with ``patches/LISA`` applied; ``lisa_build`` builds a tiny LISA with
LISA's own classes (LlavaConfig, LISAForCausalLM, CLIPVisionTower, SAM parts) and saves it as a
checkpoint. ``eval/LISA/eval_seg.py`` then does what its ``main`` does on a GPU: ``load_data``
(LISA's slow tokenizer, ``ValDataset`` on the real-format fixtures, ``collate_fn``), ``load_model``
(``LISAForCausalLM.from_pretrained`` + ``initialize_vision_modules``) and ``run`` — each image one
``model(**batch)`` inside ``shared.prune(model, ..., host="lisa")``, i.e. the patched
``model_forward(inference=True)`` reporting to the session.

References, computed apart from the glue: the stock (unpatched) ``model/LISA.py`` of the same tree
with the same weights, run as is (no method), or with the engine installed on its decoder and
``prepare``d by this test from token positions read off ``input_ids`` (in-LLM methods), or LISA's
LLaVA forward with the reducer's tokens fed to the projector plus LISA's tail transcribed (pre-LLM
reducers; the transcription is checked against the stock forward first). Layer schedules, clustering
selections and IoU counts are worked out here by hand.

Runs on LISA's pin, transformers 4.31, in an env with torchvision (``scripts/test.sh``:
``PYTHONPATH=.venvs/tf-4.31.0 .venvs/yolo/bin/python -m pytest tests/hosts/test_lisa_real.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

from . import upstream

REQUIRED_MODULES = ("torchvision", "cv2", "pycocotools", "skimage", "sentencepiece", "accelerate", "segment_anything")


def _environment() -> None:
    import importlib.util

    import transformers

    if transformers.__version__ != "4.31.0":
        upstream.unavailable(f"LISA pins transformers 4.31.0, this is {transformers.__version__} "
                             "(PYTHONPATH=.venvs/tf-4.31.0 .venvs/yolo/bin/python -m pytest ...)")
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        upstream.unavailable(f"LISA's imports need {missing} (scripts/setup_test_envs.sh installs them in .venvs/yolo)")


# ------------------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    lb: Any
    drv: Any
    ckpt: Any
    loaded: Any
    stock: Any
    workdir: Path
    runs: Dict[str, Any] = field(default_factory=dict)
    sam: Dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    _environment()
    tree = upstream.tree_or_skip("LISA")
    from . import lisa_build as lb

    work = tmp_path_factory.mktemp("lisa")
    ckpt = lb.build_checkpoint(tree, work / "ckpt")
    drv = lb.load_driver()
    loaded = lb.load_with_driver(drv, ckpt, lb.driver_args(drv, ckpt, work / "probe"))
    stock = lb.stock_model(ckpt, loaded)
    return Env(lb, drv, ckpt, loaded, stock, work)


@dataclass
class Run:
    summary: Dict[str, Any]
    calls: List[Dict[str, Any]]  # one per image: batch, output, record
    records: List[Dict[str, Any]]  # the JSONL records of all datasets, in order
    detector: Any = None
    encoder_calls: Optional[Dict[str, int]] = None  # SAM image-encoder forwards: LISA's and segment_anything's


def sam_checkpoints(env: Env) -> Dict[str, Path]:
    """SAM checkpoints (segment_anything's state-dict layout) for the tiny LISA, whose SAM is a tiny
    ``vit_tiny`` (``tests/sam_tiny.py``, registered by ``_sam_types``):

    shared: LISA's own SAM image encoder + an original-SAM prompt encoder and mask decoder (``tiny_sam``
    seed 7; not LISA's [SEG]-tuned decoder). nomask: the same, with an IoU head that predicts -1 for every
    mask (all filtered at pred_iou_thresh 0.5). other: another encoder of the same type. wide: an encoder of
    another type (24-d, ``vit_tiny24``)."""
    if env.sam:
        return env.sam
    from tests.sam_tiny import tiny_sam

    lisa_encoder = env.loaded.model.get_model().visual_model.image_encoder.state_dict()
    decoder = {k: v for k, v in tiny_sam(seed=7).state_dict().items() if not k.startswith("image_encoder.")}
    shared = {**{f"image_encoder.{k}": v.clone() for k, v in lisa_encoder.items()}, **decoder}
    nomask = dict(shared)
    head = "mask_decoder.iou_prediction_head.layers.2"
    nomask[f"{head}.weight"] = torch.zeros_like(shared[f"{head}.weight"])
    nomask[f"{head}.bias"] = torch.full_like(shared[f"{head}.bias"], -1.0)
    other = {**{k: v for k, v in tiny_sam(seed=8).state_dict().items() if k.startswith("image_encoder.")}, **decoder}
    wide = {**{k: v for k, v in tiny_sam(width=24, seed=8).state_dict().items() if k.startswith("image_encoder.")},
            **decoder}
    for name, state in (("shared", shared), ("nomask", nomask), ("other", other), ("wide", wide)):
        env.sam[name] = env.workdir / f"sam_{name}.pth"
        torch.save(state, env.sam[name])
    return env.sam


SAM_TYPES_USED = (("vit_tiny", 16), ("vit_tiny24", 24))


def _sam_types(monkeypatch) -> None:
    from tests.sam_tiny import tiny_type

    from shared import segfirst_sam

    for name, width in SAM_TYPES_USED:
        monkeypatch.setitem(segfirst_sam.SAM_TYPES, name, tiny_type(name, width))


def _count_encoders(monkeypatch) -> Dict[str, int]:
    """Count every forward of LISA's vendored SAM ``ImageEncoderViT`` and of ``segment_anything``'s."""
    import model.segment_anything.modeling.image_encoder as lisa_enc
    import segment_anything.modeling.image_encoder as sa_enc

    assert lisa_enc.ImageEncoderViT is not sa_enc.ImageEncoderViT
    counts = {"lisa": 0, "segment_anything": 0}
    for key, cls in (("lisa", lisa_enc.ImageEncoderViT), ("segment_anything", sa_enc.ImageEncoderViT)):
        def counted(self, x, _orig=cls.forward, _key=key):
            counts[_key] += 1
            return _orig(self, x)

        monkeypatch.setattr(cls, "forward", counted)
    return counts


def _fill(flag: str, env: Env) -> str:
    """``sam-shared:<shared>`` → the path of ``sam_checkpoints(env)['shared']``."""
    if "<" not in flag:
        return flag
    head, name = flag.split("<", 1)
    return head + str(sam_checkpoints(env)[name.rstrip(">")])


class HalvesDetector:
    """Stands in for YOLO (``shared.segfirst.YoloMaskSource``, tested in its own venv) with known
    instances on the ORIGINAL image: its top half, its bottom half, and (for landscape images) a
    strip at the left edge that LISA's CLIP centre crop cuts away."""

    def __init__(self, weights=None, device="cpu", **_kw):
        self.seen: List[np.ndarray] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.seen.append(image)
        h, w = image.shape[:2]
        masks = [np.zeros((h, w), bool), np.zeros((h, w), bool)]
        masks[0][: h // 2] = True
        masks[1][h // 2:] = True
        if w > h:  # the crop keeps x in [(w - h) / 2, (w + h) / 2): a strip 1 px short of it is outside
            strip = np.zeros((h, w), bool)
            strip[:, : (w - h) // 2 - 1] = True
            masks.append(strip)
        return np.stack(masks)


def run_driver(env: Env, name: str, flags: Tuple[str, ...], monkeypatch=None) -> Run:
    if name in env.runs:
        return env.runs[name]
    lb, drv, loaded = env.lb, env.drv, env.loaded
    flags = tuple(_fill(f, env) for f in flags)
    args = lb.driver_args(drv, env.ckpt, env.workdir / f"run-{name}", *flags)
    detector = counts = None
    if any(f.startswith("yolo:") for f in flags):
        import shared.segfirst

        detector = HalvesDetector()
        monkeypatch.setattr(shared.segfirst, "YoloMaskSource", lambda weights, device, **kw: detector)
    if any(f.startswith(("sam:", "sam-shared:")) for f in flags):
        _sam_types(monkeypatch)
        counts = _count_encoders(monkeypatch)
    log = lb.ForwardLog(loaded.model)
    try:
        with lb.cpu_cuda_calls():
            summary = drv.run(args, loaded.model, loaded.make_dataset, loaded.collate, loaded.dims,
                              torch.device("cpu"), loaded.dtype, env={})
    finally:
        log.close()
    records = []
    for val in args.val_dataset:
        path = Path(args.out) / f"{drv.dataset_tag(val)}.jsonl"
        records += [json.loads(x) for x in path.read_text().splitlines()]
    env.runs[name] = Run(summary, log.calls, records, detector, None if counts is None else dict(counts))
    return env.runs[name]


# ------------------------------------------------------------------------------- the code path
def test_the_driver_runs_the_patched_upstream_lisa(env):
    tree, model = env.ckpt.tree, env.loaded.model
    lisa_py = (tree.path / "model" / "LISA.py").resolve()
    assert Path(type(model).model_forward.__code__.co_filename).resolve() == lisa_py
    import utils.dataset

    assert Path(utils.dataset.__file__).resolve() == (tree.path / "utils" / "dataset.py").resolve()
    assert env.loaded.make_dataset("refcoco|unc|val").__class__ is utils.dataset.ValDataset
    assert [p.name for p in tree.patches] == sorted(p.name for p in (upstream.ROOT / "patches" / "LISA").glob("*.patch"))
    patched, stock = lisa_py.read_text(), tree.stock_file("model/LISA.py")
    assert stock.count("shape[0], 255))") == 2 and "shape[0], 255))" not in patched
    assert patched.count("shared_lisa.seg_offset(") == 2 and "shared_lisa.forward_scope(" in patched
    assert type(env.stock).model_forward.__code__.co_filename.startswith(str(tree.path / "model" / "LISA.py") + " @ ")
    assert tree.source.kind in ("submodule", "snapshot")


def test_valdataset_reads_the_fixtures_as_lisa_does(env):
    """LISA's ValDataset on the real-format fixtures: the driver's expression keys follow its
    order (REFER lists image ids through a set: 202 before 101), and its RefCOCO masks are the COCO
    polygons rasterised by pycocotools."""
    from pycocotools import mask as cocomask

    lb, drv = env.lb, env.drv
    ds = env.loaded.make_dataset("refcoco|unc|val")
    keys = [drv.expression_keys(ds, i) for i in range(len(ds))]
    assert [[(e["key"], e["sentence"]) for e in ex] for ex in keys] == [
        [("202:0", "man in red")],
        [("101:0", "person on the left"), ("101:1", "left guy"), ("101:2", "the dog")],
    ]
    inst = json.loads((lb.FIXTURES / "refer_seg" / "refcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    item = ds[1]
    masks = item[4].numpy()
    for row, ann_id in enumerate([1011, 1011, 1012]):
        poly = anns[ann_id]["segmentation"]
        want = cocomask.decode(cocomask.frPyObjects(poly, 48, 64)).sum(axis=2)
        assert int((masks[row] != want).sum()) == 0
    conv = item[3]
    assert len(conv) == 3 and all(c.count("<image>") == 1 and c.endswith("ASSISTANT: [SEG].</s>") for c in conv)
    rs = env.loaded.make_dataset("ReasonSeg|val")
    assert [e["key"] for i in range(len(rs)) for e in drv.expression_keys(rs, i)] == ["fixture_0001:0"]
    gt = rs[0][4][0]
    assert set(torch.unique(gt).tolist()) == {0, 1, 255}  # target 1, the 'ignore' shape 255


# ------------------------------------------------------------------------------------- methods
N = 256  # image tokens of the tiny tower (224 px / 14 px), as LISA-7B's
LAYERS = 6


@dataclass(frozen=True)
class Case:
    flags: Tuple[str, ...]
    method: Optional[Callable[[], Any]] = None  # in-LLM config, built here from the flag values
    reducer: Optional[Callable[[], Any]] = None  # pre-LLM reducer, built here from the flag values
    schedule: Callable[[int], List[int]] = lambda n: [n] * LAYERS  # visual tokens per layer
    query: str = "pre_seg"
    selection: Optional[str] = None  # how the clustering selection is worked out


def _csp(mode, **kw):
    from shared.methods.lvlm_csp import LVLMCSP

    return lambda: LVLMCSP(2, 64, 2, 16, clustering=mode, **kw)


def csp(mode, *extra):
    return ("--method", "lvlm_csp", "--method-args", "cluster_layers=2", "cluster_tokens=64", "scatter_layers=2",
            "prune_tokens=16", f"clustering={mode}", *extra)


CSP_SCHEDULE = lambda n: [64, 64, n, n, 16, 16]  # noqa: E731  (Lc=2 at Nc, Ls=2 at N, then Np)
#: SAM automatic masks on the tiny random SAM: a 3 x 3 point grid, no quality filters, no NMS (27 masks)
SAM_GEN = dict(points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
SAM_ARGS = ("--mask-args",) + tuple(f"{k}={v}" for k, v in SAM_GEN.items())


def _fastv():
    from shared.methods.fastv import FastV

    return FastV(layer=2, keep=64)


def _pdrop():
    from shared.methods.pyramid_drop import PyramidDrop

    return PyramidDrop(layers=(2, 4), ratio=0.5)


def _prumerge(plus):
    from shared.methods.prumerge import PruMerge, PruMergePlus

    return lambda: (PruMergePlus if plus else PruMerge)()


def _visionzip():
    from shared.methods.visionzip import VisionZip

    return VisionZip(tokens=64)


CASES: Dict[str, Case] = {
    "none": Case(()),
    "csp-uniform": Case(csp("uniform"), _csp("uniform"), schedule=CSP_SCHEDULE, selection="literal"),
    "csp-uniform-grid-pre_seg": Case(csp("uniform", "uniform_layout=grid", "seg_query=pre_seg"),
                                     _csp("uniform", uniform_layout="grid", seg_query="pre_seg"), schedule=CSP_SCHEDULE,
                                     selection="grid"),
    "csp-random": Case(csp("random", "seed=3"), _csp("random", seed=3), schedule=CSP_SCHEDULE, selection="random"),
    "csp-cls": Case(csp("cls"), _csp("cls"), schedule=CSP_SCHEDULE, selection="cls"),
    "csp-seg_first": Case(csp("seg_first") + ("--csp-masks", "yolo:unused-yolo11n-seg.pt"),
                          _csp("seg_first"), schedule=CSP_SCHEDULE, selection="seg_first"),
    "csp-seg_first-sam-shared": Case(csp("seg_first") + ("--csp-masks", "sam-shared:<shared>") + SAM_ARGS,
                                     _csp("seg_first"), schedule=CSP_SCHEDULE, selection="seg_first_sam"),
    "csp-seg_first-sam": Case(csp("seg_first") + ("--csp-masks", "sam:<shared>") + SAM_ARGS,
                              _csp("seg_first"), schedule=CSP_SCHEDULE, selection="seg_first_sam"),
    "fastv": Case(("--method", "fastv", "--method-args", "layer=2", "keep=64"), _fastv,
                  schedule=lambda n: [n, n, 64, 64, 64, 64]),
    "fastv-last": Case(("--method", "fastv", "--method-args", "layer=2", "keep=64", "--query", "last"), _fastv,
                       schedule=lambda n: [n, n, 64, 64, 64, 64], query="last"),
    "pdrop-seg": Case(("--method", "pdrop", "--method-args", "layers=(2,4)", "ratio=0.5", "--query", "seg"), _pdrop,
                      schedule=lambda n: [n, n, n // 2, n // 2, n // 4, n // 4], query="seg"),
    "prumerge": Case(("--method", "prumerge"), reducer=_prumerge(False)),
    "prumerge_plus": Case(("--method", "prumerge_plus"), reducer=_prumerge(True)),
    "visionzip": Case(("--method", "visionzip", "--method-args", "tokens=64"), reducer=_visionzip),
}


def expected_selection(env: Env, case: Case, batch) -> Optional[torch.Tensor]:
    """The clustering stage's token set for this image, worked out without the glue."""
    mode = case.selection
    if mode is None:
        return None
    if mode == "literal":  # Eq. 2 as printed: i * floor(N / Nc)
        return torch.arange(64) * 4
    if mode == "grid":  # 8 x 8 lattice on the 16 x 16 grid, cell centres: rows/cols 1, 3, ..., 15
        odd = torch.arange(1, 16, 2)
        return (odd[:, None] * 16 + odd[None, :]).reshape(-1)
    if mode == "random":  # randperm of a generator seeded from sha256(seed, image key), the documented rule
        import hashlib

        digest = hashlib.sha256(f"3\x00{batch['image_paths'][0]}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
        return torch.sort(torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:64]).values
    if mode == "cls":
        with torch.no_grad():
            scores = env.lb.cls_attention_by_hand(env.stock, batch["images_clip"])
        return torch.sort(torch.topk(scores, 64).indices).values
    raise ValueError(f"selection: no hand rule for {mode!r} (seg_first is checked by property)")


def reference(env: Env, case: Case, batch, drawn: Optional[List[torch.Tensor]] = None):
    """(pred mask logits, engine stats or None, image tokens n, selection per row or None) of one
    image without the glue. ``drawn``: Seg-First's per-row selection (random draws, checked apart)."""
    from shared.engine import pruning

    lb, stock, seg_id = env.lb, env.stock, env.loaded.seg_token_idx
    with torch.no_grad(), lb.cpu_cuda_calls():
        if case.reducer is not None:  # LLaVA forward on the reducer's tokens + LISA's tail
            reduced = case.reducer()(stock.get_model().get_vision_tower().vision_tower, batch["images_clip"])
            n = int(reduced.counts[0])
            hidden = lb.llava_hidden(stock, batch, projector_input=reduced.features)
            _, seg, _ = lb.positions(batch, seg_id, n)
            return lb.lisa_tail(stock, hidden, [p - 1 for p in seg], batch), None, n, None
        if case.method is None:  # the stock model_forward as is
            return stock(**batch)["pred_masks"][0], None, N, None
        # the stock model_forward with the engine on its decoder, prepared from input_ids positions
        starts, seg, valid = lb.positions(batch, seg_id, N)
        seg_t = torch.tensor(seg)
        query = {"pre_seg": seg_t - 1, "seg": seg_t, "last": torch.tensor(valid) + N - 2}[case.query]
        if case.selection is None:
            selection = None
        elif case.selection.startswith("seg_first"):
            selection = list(drawn)
        else:
            selection = [expected_selection(env, case, batch)] * len(starts)
        with pruning(stock.get_model(), case.method()) as eng:
            eng.prepare(visual_spans=[(s, s + N) for s in starts], query_index=query,
                        guidance_index=seg_t if case.selection else None, visual_selection=selection)
            out = stock(**batch)
        return out["pred_masks"][0], eng.last_stats, N, selection


def _iou_counts(pred: torch.Tensor, gt: torch.Tensor) -> Tuple[List[int], List[int]]:
    """LISA's intersectionAndUnion (K=2, ignore 255) counted by hand: [bg, fg] I and U."""
    p, g = pred > 0, gt.long()
    valid = g != 255
    inter = [int((~p & (g == 0) & valid).sum()), int((p & (g == 1) & valid).sum())]
    union = [int(((~p | (g == 0)) & valid).sum()), int(((p | (g == 1)) & valid).sum())]
    return inter, union


@pytest.mark.parametrize("name", list(CASES))
def test_method_through_the_driver_equals_the_stock_reference(env, name, monkeypatch):
    case = CASES[name]
    run = run_driver(env, name, case.flags, monkeypatch)
    assert [len(c["batch"]["conversation_list"]) for c in run.calls] == [1, 3, 1]  # 2 RefCOCO images, 1 ReasonSeg
    assert len(run.records) == 5
    rec_iter = iter(run.records)
    for i, call in enumerate(run.calls):
        batch, out, record, selection = call["batch"], call["output"], call["record"], call["selection"]
        if case.selection == "seg_first":
            _check_seg_first(run, i, record, selection, batch)
        if case.selection == "seg_first_sam":
            _check_sam_masks(env, record, selection, batch)
        ref_pred, ref_stats, n, sel = reference(env, case, batch, drawn=selection)
        pred = out["pred_masks"][0]
        assert pred.shape == ref_pred.shape
        assert int((pred != ref_pred).sum()) == 0, f"{name}: image {i}: mask logits differ from the stock reference"
        if ref_stats is not None:
            assert torch.equal(record.stats.visual, ref_stats.visual) and torch.equal(record.stats.tokens, ref_stats.tokens)
        if sel is not None:
            assert [s.tolist() for s in selection] == [s.tolist() for s in sel]
        _, _, valid = env.lb.positions(batch, env.loaded.seg_token_idx, n)
        for r in range(len(valid)):
            rec = next(rec_iter)
            size = 64 if case.selection != "seg_first_sam" else len(selection[r])  # SAM's |S|: measured
            assert rec["visual_per_layer"] == ([size] * 2 + case.schedule(n)[2:] if case.selection else case.schedule(n))
            assert rec["image_tokens"] == n and rec["text_tokens"] == valid[r] - 1
            assert rec["selected"] == (size if case.selection else None)
            inter, union = _iou_counts(pred[r], out["gt_masks"][0][r])
            assert (rec["intersection"], rec["union"]) == (inter, union)
    if case.reducer is not None:  # the reducer really shortened the sequence
        assert all(r["image_tokens"] < N for r in run.records)
    if name != "none":  # and the method changed what SAM got: the comparison above is not vacuous
        base = run_driver(env, "none", CASES["none"].flags)
        for call, plain in zip(run.calls, base.calls):
            assert not torch.equal(call["output"]["pred_masks"][0], plain["output"]["pred_masks"][0])


def _check_seg_first(run: Run, i: int, record, selection, batch) -> None:
    """Seg-First read the original image from the batch's path and mapped the known instances:
    the edge strip outside the centre crop gets no quota, the halves 32 each of Nc = 64."""
    import cv2

    img = run.detector.seen[i]
    path = batch["image_paths"][0]
    assert np.array_equal(img, cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB))
    h, w = img.shape[:2]
    info = record.info[0]
    quotas = info["quotas"]
    quotas = quotas.tolist() if hasattr(quotas, "tolist") else list(quotas)
    assert quotas == ([32, 32, 0] if w > h else [32, 32])
    assert record.host["instances"] == (3 if w > h else 2) and not info["fallback_used"]
    for s in selection:
        assert int((s < 128).sum()) == 32 and int((s >= 128).sum()) == 32  # top half = grid rows 0-7
    assert all(torch.equal(s, selection[0]) for s in selection)


def _sam_reference(env: Env, path: str, name: str = "shared") -> np.ndarray:
    """segment_anything's own SamAutomaticMaskGenerator, standalone on the checkpoint's SAM (tiny_sam with
    its weights), on the image as LISA reads it (cv2, BGR -> RGB)."""
    import cv2
    from segment_anything import SamAutomaticMaskGenerator

    from tests.sam_tiny import tiny_sam

    sam = tiny_sam()
    sam.load_state_dict(torch.load(sam_checkpoints(env)[name]), strict=True)
    img = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    anns = SamAutomaticMaskGenerator(sam, **SAM_GEN).generate(img)
    return np.stack([a["segmentation"] for a in anns]) if anns else np.zeros((0,) + img.shape[:2], bool)


def _check_sam_masks(env: Env, record, selection, batch) -> None:
    """Seg-First got the official generator's masks: instance count, Eq. 5 quotas worked out here from
    the mask areas in the CLIP crop (quota = max(1, floor(64 * area / sum of areas)), 0 outside), and every
    drawn token inside some mask's token set."""
    from shared.segfirst import masks_to_grid

    masks = _sam_reference(env, batch["image_paths"][0])
    grid = masks_to_grid(masks)
    areas = grid.areas.tolist()
    total = sum(areas)
    want = [max(1, (64 * a) // total) if a > 0 else 0 for a in areas]
    info = record.info[0]
    assert masks.shape[0] == 27 and record.host["instances"] == 27 and not info["fallback_used"]
    assert list(info["quotas"].tolist()) == want
    union = set(int(t) for ts in grid.token_sets for t in ts.tolist())
    for s in selection:
        assert set(s.tolist()) <= union and int(s.numel()) == info["count"] and torch.equal(s, selection[0])


def test_sam_shared_encoder_equals_standalone_and_adds_no_encoder_call(env, monkeypatch):
    """sam-shared (SAM's decoder on the embeddings LISA's encoder made) and sam (segment_anything's own
    encoder on the image) give the same masks, selections and LISA outputs; the shared run encodes each
    image once (LISA's encoder), the standalone one twice (LISA's + its own)."""
    shared = run_driver(env, "csp-seg_first-sam-shared", CASES["csp-seg_first-sam-shared"].flags, monkeypatch)
    alone = run_driver(env, "csp-seg_first-sam", CASES["csp-seg_first-sam"].flags, monkeypatch)
    images = len(shared.calls)
    assert images == 3
    assert shared.encoder_calls == {"lisa": images, "segment_anything": 0}
    assert alone.encoder_calls == {"lisa": images, "segment_anything": images}
    drop = ("seconds", "mask_source")
    strip = lambda r: {k: ({a: b for a, b in v.items() if a != "mask_seconds"} if k == "info" else v)  # noqa: E731
                       for k, v in r.items() if k not in drop}
    assert [strip(r) for r in shared.records] == [strip(r) for r in alone.records]
    for a, b in zip(shared.calls, alone.calls):
        assert int((a["output"]["pred_masks"][0] != b["output"]["pred_masks"][0]).sum()) == 0


def test_sam_records_and_table(env, monkeypatch):
    run = run_driver(env, "csp-seg_first-sam-shared", CASES["csp-seg_first-sam-shared"].flags, monkeypatch)
    path = str(sam_checkpoints(env)["shared"])
    sizes = []
    for rec in run.records:
        assert rec["mask_source"] == f"sam-shared:{path}"
        assert rec["info"]["instances"] == 27 and rec["info"]["mask_seconds"] > 0 and not rec["info"]["fallback_used"]
        assert rec["selected"] == rec["info"]["count"]
        sizes.append(rec["selected"])
    assert run.summary["settings"]["csp_masks"] == f"sam-shared:{path}"
    assert run.summary["settings"]["mask_args"] == SAM_GEN
    m = run.summary["benchmarks"]["refcoco_unc_val"]["metrics"]
    assert m["seg_first_fallbacks"] == 0 and m["selected"] == pytest.approx(sum(sizes[:4]) / 4)
    header, rows, _ = env.drv.table([run.summary])
    row = dict(zip(header, rows[0]))
    assert row["masks"] == "sam-shared:sam_shared.pth" and row["fallbacks"] == "0"
    assert row["selected"] == f"{sum(sizes) / len(sizes):.1f}"
    assert "| sam-shared:sam_shared.pth |" in (env.workdir / "run-csp-seg_first-sam-shared" / "table.md").read_text()


def test_sam_without_masks_falls_back_per_sample(env, monkeypatch):
    """A decoder whose every mask fails pred_iou_thresh: each expression records the uniform fallback
    (Eq. 2 literal, i * 4) and the table counts them."""
    flags = csp("seg_first") + ("--csp-masks", "sam-shared:<nomask>", "--mask-args", "points_per_side=3",
                                "pred_iou_thresh=0.5")
    run = run_driver(env, "csp-seg_first-sam-nomask", flags, monkeypatch)
    for call in run.calls:
        assert [s.tolist() for s in call["selection"]] == [(torch.arange(64) * 4).tolist()] * len(call["selection"])
        assert call["record"].host["instances"] == 0
    assert all(r["info"]["fallback_used"] and r["info"]["instances"] == 0 and r["selected"] == 64 for r in run.records)
    header, rows, _ = env.drv.table([run.summary])
    assert dict(zip(header, rows[0]))["fallbacks"] == str(len(run.records)) == "5"


def test_sam_shared_refuses_another_encoder_and_another_image(env, monkeypatch):
    _sam_types(monkeypatch)
    ck = sam_checkpoints(env)
    seg = csp("seg_first") + SAM_ARGS
    with pytest.raises(ValueError, match=r"^checkpoint: its image encoder is not the host's"):
        _drive(env, env.workdir / "sam-other", *seg, "--csp-masks", f"sam-shared:{ck['other']}")
    with pytest.raises(ValueError, match=r"^checkpoint: a vit_tiny24 SAM \(24-d, 2 blocks\), but the host's image "
                                         r"encoder is vit_tiny \(16-d, 2 blocks\)"):
        _drive(env, env.workdir / "sam-wide", *seg, "--csp-masks", f"sam-shared:{ck['wide']}")
    import shared.hosts.lisa as host

    real = host._load_rgb
    monkeypatch.setattr(host, "_load_rgb", lambda p: np.ascontiguousarray(real(p).transpose(1, 0, 2)))
    with pytest.raises(ValueError, match=r"^image: the original image is \d+x\d+ \(SAM input \d+x\d+\), but the "
                                         r"embeddings were computed from a"):
        _drive(env, env.workdir / "sam-transposed", *seg, "--csp-masks", f"sam-shared:{ck['shared']}")


def test_lisa_tail_transcription_equals_the_stock_forward(env):
    """The reducers' reference (LLaVA forward + LISA's tail written out here) is exact on the stock model."""
    run = run_driver(env, "none", CASES["none"].flags)
    lb, stock = env.lb, env.stock
    for call in run.calls:
        batch = call["batch"]
        with torch.no_grad(), lb.cpu_cuda_calls():
            want = stock(**batch)["pred_masks"][0]
            _, seg, _ = lb.positions(batch, env.loaded.seg_token_idx, N)
            got = lb.lisa_tail(stock, lb.llava_hidden(stock, batch), [p - 1 for p in seg], batch)
        assert int((got != want).sum()) == 0


def test_metrics_summarise_the_records(env):
    run = run_driver(env, "none", CASES["none"].flags)
    ref = run.records[:4]
    ious = [r["intersection"][1] / (r["union"][1] + 1e-5) for r in ref]
    s = run.summary["benchmarks"]["refcoco_unc_val"]["metrics"]
    assert s["gIoU"] == pytest.approx(100 * sum(ious) / 4, abs=1e-9)
    assert s["cIoU"] == pytest.approx(100 * sum(r["intersection"][1] for r in ref) /
                                      (sum(r["union"][1] for r in ref) + 1e-10), abs=1e-9)
    assert 0 < s["gIoU"] < 100  # a random model: neither empty nor perfect masks


# ------------------------------------------------------------------------- the driver's loop
def _drive(env: Env, out: Path, *flags: str, val=("refcoco|unc|val",), run_env=None, **arg_overrides):
    args = env.lb.driver_args(env.drv, env.ckpt, out, *flags, val=val)
    for k, v in arg_overrides.items():
        setattr(args, k, v)
    with env.lb.cpu_cuda_calls():
        return env.drv.run(args, env.loaded.model, env.loaded.make_dataset, env.loaded.collate, env.loaded.dims,
                           torch.device("cpu"), env.loaded.dtype, env=run_env or {})


def _lines(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_killed_run_resumes_and_other_settings_are_refused(env, monkeypatch):
    base = run_driver(env, "fastv", CASES["fastv"].flags)
    out = env.workdir / "resume"
    calls = []
    original = type(env.loaded.model).forward

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(type(env.loaded.model), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        _drive(env, out, *CASES["fastv"].flags)
    assert [r["key"] for r in _lines(out / "refcoco_unc_val.jsonl")] == ["202:0"]
    calls.clear()
    monkeypatch.setattr(type(env.loaded.model), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    _drive(env, out, *CASES["fastv"].flags)
    assert len(calls) == 1  # only image 101 was run again
    got = _lines(out / "refcoco_unc_val.jsonl")
    want = [r for r in base.records if r["key"] in {g["key"] for g in got}]
    assert [(r["key"], r["intersection"], r["union"]) for r in got] == [(r["key"], r["intersection"], r["union"])
                                                                       for r in want]
    for flag, value, field_ in (("--seed", "1", "seed"), ("--precision", "bf16", "precision"),
                                ("--dataset-dir", str(env.workdir), "dataset_dir")):
        with pytest.raises(ValueError, match=rf"^out: .*other settings .*'{field_}'"):
            _drive(env, out, *CASES["fastv"].flags, flag, value)


def test_a_missing_image_is_named_and_can_be_skipped(env, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env.lb.FIXTURES, data)
    images = sorted((data / "refer_seg" / "images" / "mscoco" / "images" / "train2014").glob("*.jpg"))
    gone = next(p for p in images if "101" in p.name)
    gone.unlink()
    loaded = env.lb.load_with_driver(env.drv, env.ckpt, env.lb.driver_args(env.drv, env.ckpt, tmp_path / "probe"))
    args = env.lb.driver_args(env.drv, env.ckpt, tmp_path / "raise", val=("refcoco|unc|val",))
    args.dataset_dir = str(data)
    make = env.drv.load_data(args)[3]
    with pytest.raises(FileNotFoundError, match=rf"^image: {gone} does not exist"), env.lb.cpu_cuda_calls():
        env.drv.run(args, loaded.model, make, loaded.collate, loaded.dims, torch.device("cpu"), loaded.dtype, env={})
    assert not (tmp_path / "raise" / "table.md").exists()
    args.out, args.on_error = str(tmp_path / "skip"), "skip"
    with env.lb.cpu_cuda_calls():
        summary = env.drv.run(args, loaded.model, make, loaded.collate, loaded.dims, torch.device("cpu"), loaded.dtype,
                              env={})
    recs = _lines(tmp_path / "skip" / "refcoco_unc_val.jsonl")
    assert [r["key"] for r in recs] == ["202:0", "101:0", "101:1", "101:2"]
    assert all(r["skipped"].startswith("FileNotFoundError: image:") for r in recs[1:]) and "skipped" not in recs[0]
    b = summary["benchmarks"]["refcoco_unc_val"]
    assert (b["n"], b["skipped"]) == (1, 3)
    assert "| 3 |" in (tmp_path / "skip" / "table.md").read_text()


def test_a_split_without_data_is_refused_before_anything_runs(env):
    out = env.workdir / "empty"
    with pytest.raises(ValueError, match=r"^val_dataset: ReasonSeg\|test has no images"):
        _drive(env, out, val=("refcoco|unc|val", "ReasonSeg|test"))
    with pytest.raises(ValueError, match=r"^val_dataset: refcoco\|unc\|testB has no expressions in .*refs\(unc\).p"):
        _drive(env, out, val=("refcoco|unc|val", "refcoco|unc|testB"))
    assert not (out / "table.md").exists() and not (out / "refcoco_unc_val.jsonl").exists()


def test_a_sharded_run_merges_to_the_single_process_result(env):
    base = run_driver(env, "csp-uniform", CASES["csp-uniform"].flags)
    out = env.workdir / "sharded"
    val = ("refcoco|unc|val", "ReasonSeg|val")
    for rank in (1, 0):
        assert _drive(env, out, *CASES["csp-uniform"].flags, val=val,
                      run_env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}) is None
    assert not (out / "refcoco_unc_val.jsonl").exists()
    summary = _drive(env, out, *CASES["csp-uniform"].flags, val=val, merge_only=True,
                     run_env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    merged = _lines(out / "refcoco_unc_val.jsonl") + _lines(out / "ReasonSeg_val.jsonl")
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in merged] == \
        [{k: v for k, v in r.items() if k not in drop} for r in base.records]
    assert summary["benchmarks"]["refcoco_unc_val"]["metrics"]["gIoU"] == \
        base.summary["benchmarks"]["refcoco_unc_val"]["metrics"]["gIoU"]


def test_a_reducer_stacks_with_fastv_and_needs_are_refused(env):
    run = run_driver(env, "visionzip+fastv", ("--pre", "visionzip", "--pre-args", "tokens=64",
                                              "--method", "fastv", "--method-args", "layer=2", "keep=16"))
    for r in run.records:
        assert r["visual_per_layer"] == [64, 64, 16, 16, 16, 16] and r["visual_tokens"] == N
        assert r["pruning_ratio"] == pytest.approx(1 - (2 * 64 + 4 * 16) / 6 / N)
    base = run_driver(env, "visionzip", CASES["visionzip"].flags)
    assert any(not torch.equal(a["output"]["pred_masks"][0], b["output"]["pred_masks"][0])
               for a, b in zip(run.calls, base.calls))
    with pytest.raises(ValueError, match=r"^method: segpruner needs 'geometry' .*host 'lisa'"):
        _drive(env, env.workdir / "refused", "--method", "segpruner")
    with pytest.raises(ValueError, match=r"^method: lvlm_csp needs 'instance_masks' .*pass mask_source="):
        import shared

        with shared.prune(env.loaded.model, shared.LVLMCSP(2, 64, 2, 16, clustering="seg_first"), host="lisa"):
            pass


@pytest.mark.parametrize("label", [label for label, _ in __import__("shared.apps.matrix", fromlist=["ROWS"]).ROWS])
def test_matrix_cell_on_lisa(env, label):
    """Each row of ``python -m shared.apps.matrix`` on the real patched LISA (one image, 3 expressions): a ✔
    in-LLM cell keeping every token gives LISA's masks bit for bit and a pruning config follows its
    schedule; a reducer sends its K tokens; a ✘ cell is refused naming the need."""
    from dataclasses import replace

    import shared
    from shared.apps import matrix
    from shared.needs import MissingNeed

    method = dict(matrix.ROWS)[label]
    cell = matrix.cell(method, "lisa")
    model = env.loaded.model
    if cell.startswith("✘"):
        need = cell[2:].split(",")[0]
        with pytest.raises(MissingNeed, match=rf"^method: {method.name} needs .*'{need}'.*host 'lisa'"):
            with shared.prune(model, method):
                pass
        return
    ds = env.loaded.make_dataset("refcoco|unc|val")
    batch = env.drv.to_device(env.loaded.collate([ds[1]]), "cpu", env.loaded.dtype)
    opts = {"mask_source": HalvesDetector()} if "mask_source=" in cell else {}
    with torch.no_grad(), env.lb.cpu_cuda_calls():
        stock = model(**batch)["pred_masks"][0]
        if method.stage == "llm":
            if method.name == "adatoken3d":  # a schedule fits one layer count: LISA's tiny LLaMA has LAYERS
                method = matrix.adatoken_row(LAYERS)
            full = {"fastv": lambda m: replace(m, keep=None, keep_ratio=1.0), "pdrop": lambda m: replace(m, ratio=1.0),
                    "random": lambda m: replace(m, keep=None, keep_ratio=1.0),
                    "adatoken3d": lambda m: matrix.adatoken_keep_all(LAYERS),
                    }.get(method.name, lambda m: replace(m, cluster_tokens=N, prune_tokens=N))(method)
            with shared.prune(model, full, **opts):
                out = model(**batch)["pred_masks"][0]
            assert int((out != stock).sum()) == 0, f"{label}: keeping every token changed LISA's masks"
            with shared.prune(model, method, **opts) as session:
                model(**batch)
            vis = session.last.stats.visual[0].tolist()
            assert vis == (method.schedule(N, LAYERS, vis[0]) if method.name == "lvlm_csp" else method.schedule(N, LAYERS))
        else:
            small = replace(method, adaptive=False, reduction_ratio=0.25) if method.name.startswith("prumerge") else method
            with shared.prune(model, small) as session:
                model(**batch)
            rec = session.last
            k = rec.host["image_tokens"]
            assert rec.stats.visual[0].tolist() == [k] * LAYERS and k < N and rec.stats.visual_tokens.tolist() == [N] * 3
