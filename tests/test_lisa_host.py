"""LISA host pieces that need no LISA checkout: the spliced-sequence layout, the driver's dataset names
and its CLI. The real patched LISA (tiny random weights, LISA's own classes and ValDataset) runs every
method through the driver in ``tests/hosts/test_lisa_real.py``."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.hosts import lisa

ROOT = Path(__file__).resolve().parents[1]
SEG = 100


def _driver():
    name = "lisa_eval_seg_unit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / "LISA" / "eval_seg.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_the_spliced_layout_by_hand():
    """Rows of input_ids with the placeholder at 35 and [SEG] near the end: the image occupies
    [35, 35 + n) of the spliced sequence and a later input index i moves to i + n - 1."""
    ids = torch.full((2, 60), 7)
    ids[:, 35] = lisa.IMAGE_TOKEN_INDEX
    ids[0, 55], ids[1, 50] = SEG, SEG
    lay = lisa.expanded_layout(ids, 16, SEG)
    assert lay.visual_spans == [(35, 51), (35, 51)]
    assert lay.seg_index.tolist() == [55 + 15, 50 + 15]
    assert lay.length == 60 + 15
    no_seg = ids.clone()
    no_seg[1, 50] = 7
    assert lisa.expanded_layout(no_seg, 16, SEG).seg_index.tolist() == [70, -1]
    bad = ids.clone()
    bad[1, 3] = lisa.IMAGE_TOKEN_INDEX
    with pytest.raises(ValueError, match="^input_ids: expected exactly one image placeholder"):
        lisa.image_starts(bad)
    early = ids.clone()
    early[0, 10] = SEG
    early[0, 55] = 7
    with pytest.raises(ValueError, match=r"^input_ids: a \[SEG\] token precedes the image placeholder"):
        lisa.expanded_layout(early, 16, SEG)
    with pytest.raises(ValueError, match="^image_tokens"):
        lisa.expanded_layout(ids, 0, SEG)


def test_host_options_are_validated():
    from shared.hosts.lisa import LisaHost

    class Fake(torch.nn.Module):
        pass

    for opts, match in [(dict(query="first"), "^query"), (dict(mask_threshold=0.0), "^mask_threshold"),
                        (dict(mask_threshold=True), "^mask_threshold"), (dict(views=[None]), "^views: not an option")]:
        with pytest.raises(ValueError, match=match):
            LisaHost(Fake(), **opts)
    with pytest.raises(TypeError, match="^mask_source"):
        LisaHost(Fake(), mask_source="yolo.pt")


def test_dataset_names():
    drv = _driver()
    assert drv.expand_val_datasets(["refcoco+|unc|val|testA", "ReasonSeg|val|test"]) == [
        "refcoco+|unc|val", "refcoco+|unc|testA", "ReasonSeg|val", "ReasonSeg|test"]
    assert drv.dataset_title("refcoco+|unc|testA") == "RefCOCO+ testA" and drv.dataset_tag("refcoco|unc|val") == "refcoco_unc_val"
    for bad in (["refcoco|val"], ["ReasonSeg"], ["coco|x|y"], ["refcoco|unc|val", "refcoco|unc|val"], ["refcoco||val"]):
        with pytest.raises(ValueError, match="^val_dataset"):
            drv.expand_val_datasets(bad)


def test_methods_and_the_paper_preset_from_flags():
    from shared import evalkit
    from shared.methods.lvlm_csp import LVLMCSP

    drv = _driver()
    args = drv.parse_args(["--out", "x", "--method", "lvlm_csp", "--method-args", "preset=7b-224/10-48-4-8",
                           "clustering=cls", "seed=3"])
    (m,) = evalkit.methods_from_args(args)
    assert isinstance(m, LVLMCSP) and m.paper_tuple == (10, 48, 4, 8) and (m.clustering, m.seed) == ("cls", 3)
    assert args.protocol == "custom"
    paper = drv.parse_args(["--out", "x", "--preset", "paper"])
    (m,) = evalkit.methods_from_args(paper)
    assert m.paper_tuple == (8, 64, 6, 16) and paper.protocol == "paper" and paper.precision == "bf16"
    changed = drv.parse_args(["--out", "x", "--preset", "paper", "--precision", "fp32"])
    assert changed.protocol == "paper*"
    for bad, match in [(["--method", "fastv", "--method-args", "layer=2", "keep=True"], "^keep"),
                       (["--method", "fastv", "--method-args", "layer"], "^--method-args: expected K=V"),
                       (["--method", "nosuch"], "^--method: unknown method 'nosuch'"),
                       (["--pre", "fastv", "--pre-args", "layer=2", "keep=4"], "^--pre: fastv acts inside the LLM"),
                       (["--method", "lvlm_csp", "--method-args", "preset=7b-224/1-2-3-4"], "^--method: unknown preset")]:
        with pytest.raises(ValueError, match=match):
            evalkit.methods_from_args(drv.parse_args(["--out", "x"] + bad))


def test_eval_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "eval" / "LISA" / "eval.sh")], check=True)


def test_mask_source_flags(capsys):
    from shared import evalkit

    drv = _driver()
    seg = ["--method", "lvlm_csp", "--method-args", "preset=7b-224/8-64-6-16", "clustering=seg_first"]
    args = drv.parse_args(["--out", "x", *seg, "--csp-masks", "sam-shared:/ckpt/sam_vit_h_4b8939.pth",
                           "--mask-args", "points_per_side=16", "pred_iou_thresh=0.8"])
    assert (args.csp_masks, args.mask_kwargs) == ("sam-shared:/ckpt/sam_vit_h_4b8939.pth",
                                                  {"points_per_side": 16, "pred_iou_thresh": 0.8})
    assert drv.mask_label(args.csp_masks) == "sam-shared:sam_vit_h_4b8939.pth" and drv.mask_label(None) is None
    for argv, message in ((["--csp-masks", "detr:x.pt"], "csp_masks: expected KIND:PATH with KIND one of yolo, sam, sam-shared"),
                          (["--yolo-weights", "y.pt"], "--yolo-weights was replaced by --csp-masks yolo:PATH"),
                          (["--yolo-device", "cpu"], "--yolo-device was replaced by --mask-device"),
                          (["--mask-args", "conf=0.3"], "--mask-args: parameters of a mask source, but no --csp-masks")):
        with pytest.raises(SystemExit):
            drv.parse_args(["--out", "x", *argv])
        assert message in capsys.readouterr().err
    methods = evalkit.methods_from_args(drv.parse_args(["--out", "x", *seg]))
    with pytest.raises(ValueError, match=r"^csp_masks: Seg-First clustering needs --csp-masks yolo:PATH\|sam:PATH"):
        drv.host_options(drv.parse_args(["--out", "x", *seg]), methods, "cpu")
    fastv = drv.parse_args(["--out", "x", "--method", "fastv", "--method-args", "layer=2", "keep=64",
                            "--csp-masks", "yolo:y.pt"])
    with pytest.raises(ValueError, match=r"^csp_masks: yolo:y.pt is for Seg-First clustering"):
        drv.host_options(fastv, evalkit.methods_from_args(fastv), "cpu")
    with pytest.raises(ValueError, match=r"^weights: no file at 'y.pt'"):  # the spec reaches YoloMaskSource
        drv.host_options(drv.parse_args(["--out", "x", *seg, "--csp-masks", "yolo:y.pt"]), methods, "cpu")
