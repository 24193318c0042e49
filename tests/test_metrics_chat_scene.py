"""Chat-Scene's metrics (shared.metrics.chat_scene, shared.metrics.boxes3d).

Reference 1: the real upstream ``utils/eval.py``/``helper.py``/``box_utils.py`` (the pinned tree from
tests/hosts/upstream.py), imported without leaving its top-level ``utils`` package behind and run on the
fixtures in tests/fixtures/chat_scene (made by make_fixtures.py there), with its files copied to the fixed
paths it reads; results must be equal (EM/Acc/F1 and the caption metrics: exact floats). Both sides share
one METEOR JVM (its start is most of this file's run time). Reference 2: small cases worked out by hand.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.metrics import chat_scene as cs
from shared.metrics.boxes3d import IOU_EPS, box_iou, box_iou_matrix
from shared.metrics.qa import clean_answer, java_available, leo_answer_match
from tests.hosts import upstream

FIX = Path(__file__).resolve().parent / "fixtures" / "chat_scene"
JAVA = java_available()
needs_java = pytest.mark.skipif(not JAVA, reason="no `java` on PATH: PTBTokenizer and METEOR need a JRE")
BENCHMARKS = ("scanrefer", "multi3dref", "scan2cap", "scanqa", "sqa3d")

CLEAN_CASES = [
    "", " ", "The TV!", "  two   chairs  ", "Letf side.", "let it be", "no1 mat2", "None", "0", "23 chairs", "12",
    "an apple", "a", "the the table", "o'   clock", "oclock", "backwards", "Brown chair.", "it's on the left",
    "caf\u00e7\u2019s", "line\nbreak", "tab\tthere", "x-ray: 3:30", "rigth rght tehre behine chai wasing waslked",
    "\u0130stanbul", "twenty-three", "25", "1,000", "LEFT.", "on the left!",
]
MATCH_CASES = [
    ["chair", ["brown chair", "chair"]], ["", [""]], ["", ["chair"]], ["chair", ["chairs"]], ["brown chair", ["chair"]],
    ["left side", ["leftside of table"]], ["table", ["desk"]], ["two", []], ["a b", ["ab"]],
]
BOX_CASES = [
    [[0, 0, 0, 1, 1, 1], [0.5, 0, 0, 1, 1, 1]], [[0, 0, 0.5, 1, 1, 1], [0, 0, 1, 1, 1, 2]],
    [[0.1, -0.2, 0.3, 0.7, 1.1, 0.9], [0.2, -0.1, 0.25, 0.8, 1.0, 1.3]], [[0, 0, 0, 1, 1, 1], [5, 5, 5, 1, 1, 1]],
    [[0, 0, 0, -1, 1, 1], [0.25, 0, 0, 1, 1, 1]], [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]],
]


def load(name):
    return json.loads((FIX / name).read_text())


PATHS = dict(
    instance_attributes=FIX / "scannet_mask3d_val_attributes.pt",
    scannet_attributes=FIX / "scannet_val_attributes.pt",
)


# ---------------------------------------------------------------------------------------------------
# the real upstream code and ours on the fixtures


def import_upstream_utils(tree: Path):
    """``utils.eval``, ``utils.helper``, ``utils.box_utils`` of ``tree``; afterwards ``sys.modules`` and
    ``sys.path`` are as before (another host's ``utils`` may be imported in this process)."""
    is_utils = lambda name: name == "utils" or name.startswith("utils.")  # noqa: E731
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if is_utils(k)}
    saved_path = list(sys.path)
    sys.path.insert(0, str(tree))
    try:
        with warnings.catch_warnings():  # helper.py's regexes have invalid escapes ("\\s")
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            mods = [importlib.import_module(f"utils.{m}") for m in ("eval", "helper", "box_utils")]
    finally:
        for k in [k for k in sys.modules if is_utils(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = saved_path  # eval.py appends "." at import
    return mods


def run_upstream(tree: Path, work: Path, scorers) -> dict:
    """Every upstream function on the fixtures, its files copied to the paths it reads relative to ``work``.
    Caption metrics through pycocoevalcap as ``tasks/train.py`` sets them up (METEOR shared with ours);
    without Java a pass-through tokenizer and no scorers, so only the EM keys come back."""
    ev, helper, box_utils = import_upstream_utils(tree)
    ann = work / "annotations"
    for sub in ("scannet", "scanrefer"):
        (ann / sub).mkdir(parents=True)
    for name in ("scannet_val_attributes.pt", "scannet_mask3d_val_attributes.pt", "scan2cap_val_corpus.json"):
        shutil.copy(FIX / name, ann / name)
    shutil.copy(FIX / "ScanRefer_filtered.json", ann / "scanrefer" / "ScanRefer_filtered.json")
    shutil.copy(FIX / "scannetv2-labels.combined.tsv", ann / "scannet" / "scannetv2-labels.combined.tsv")
    mask3d = str(ann / "scannet_mask3d_val_attributes.pt")
    files = {k: [None, None, mask3d, None] for k in ("scanrefer", "multi3dref", "scan2cap")}  # [2]: instance attrs
    config = SimpleNamespace(val_file_dict=files)
    preds = {k: load(f"preds_{k}.json") for k in BENCHMARKS}
    if scorers is not None:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        up_scorers = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (scorers.meteor, "METEOR"),
                      (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    else:
        tokenizer = SimpleNamespace(tokenize=lambda d: {k: [c["caption"] for c in v] for k, v in d.items()})
        up_scorers = []
    floats = lambda d: {k: float(v) for k, v in d.items()}  # noqa: E731
    out = {"files": {m.__name__: m.__file__ for m in (ev, helper, box_utils)}}
    cwd = os.getcwd()
    os.chdir(work)
    try:
        out["built_lookup"] = helper.scanrefer_get_unique_multiple_lookup()  # no lookup json yet: built
        shutil.copy(FIX / "scanrefer_unique_multiple_lookup.json", ann / "scanrefer_unique_multiple_lookup.json")
        out["scanrefer"] = floats(ev.calc_scanrefer_score(preds["scanrefer"], config))
        out["multi3dref"] = floats(ev.calc_multi3dref_score(preds["multi3dref"], config))
        if scorers is not None:
            out["scan2cap"] = floats(ev.calc_scan2cap_score(preds["scan2cap"], tokenizer, up_scorers, config))
        out["scanqa_compat"] = floats(ev.calc_scanqa_score(preds["scanqa"], tokenizer, up_scorers, config))
        # the reference for cleaned refs: upstream's SQA3D code (same steps, refs cleaned) on the ScanQA samples
        as_sqa = [dict(p, type_info=0) for p in preds["scanqa"]]
        out["scanqa_cleaned_refs"] = floats(ev.calc_sqa3d_score(as_sqa, tokenizer, up_scorers, config))
        out["sqa3d"] = floats(ev.calc_sqa3d_score(preds["sqa3d"], tokenizer, up_scorers, config))
    finally:
        os.chdir(cwd)
    out["clean_answer"] = [helper.clean_answer(s) for s in CLEAN_CASES]
    out["answer_match"] = [list(helper.answer_match(p, refs)) for p, refs in MATCH_CASES]
    corners = box_utils.construct_bbox_corners
    out["box_iou"] = [float(box_utils.box3d_iou(corners(a[:3], a[3:]), corners(b[:3], b[3:]))) for a, b in BOX_CASES]
    return out


@pytest.fixture(scope="module")
def scorers():
    if not JAVA:
        yield None
        return
    with cs.CaptionScorers() as s:
        s.meteor  # start the METEOR JVM now: it loads its tables while the other work runs
        yield s


@pytest.fixture(scope="module")
def tree():
    return Path(upstream.tree_or_skip("Chat-Scene").path)


@pytest.fixture(scope="module")
def up(tree, scorers, tmp_path_factory):
    return run_upstream(tree, tmp_path_factory.mktemp("chat_scene_upstream"), scorers)


@pytest.fixture(scope="module")
def ours(scorers):
    lookup = FIX / "scanrefer_unique_multiple_lookup.json"
    out = {
        "scanrefer": cs.score_scanrefer(load("preds_scanrefer.json"), unique_multiple_lookup=lookup, **PATHS),
        "multi3dref": cs.score_multi3dref(load("preds_multi3dref.json"), **PATHS),
        "scanqa_compat": cs.score_scanqa(load("preds_scanqa.json"), scorers, compat_ref_overwrite=True,
                                         caption_metrics=JAVA),
        "scanqa": cs.score_scanqa(load("preds_scanqa.json"), scorers, caption_metrics=JAVA),
        "sqa3d": cs.score_sqa3d(load("preds_sqa3d.json"), scorers, caption_metrics=JAVA),
    }
    if JAVA:
        out["scan2cap"] = cs.score_scan2cap(load("preds_scan2cap.json"), corpus=FIX / "scan2cap_val_corpus.json",
                                            scorers=scorers, **PATHS)
    return out


def test_upstream_run_used_the_real_tree(up, tree):
    for mod in ("utils.eval", "utils.helper", "utils.box_utils"):
        assert Path(up["files"][mod]).resolve() == (tree / "utils" / (mod[6:] + ".py")).resolve()
    left = [k for k, m in sys.modules.items()
            if k.split(".")[0] == "utils" and str(tree) in str(getattr(m, "__file__", ""))]
    assert left == []  # the tree's utils package was not left behind


def test_scanrefer_equals_upstream(ours, up):
    assert ours["scanrefer"] == up["scanrefer"]


def test_multi3dref_equals_upstream(ours, up):
    res = up["multi3dref"]
    assert list(ours["multi3dref"]) == list(res)  # same keys in the same order
    assert ours["multi3dref"] == res


@needs_java
def test_scan2cap_equals_upstream(ours, up):
    res = up["scan2cap"]
    assert list(ours["scan2cap"]) == list(res)
    assert ours["scan2cap"] == res


def test_scanqa_compat_equals_upstream(ours, up):
    assert ours["scanqa_compat"] == up["scanqa_compat"]


def test_scanqa_cleaned_refs_equals_upstream_sqa3d_code(ours, up):
    """compat_ref_overwrite=False is upstream's SQA3D computation (cleaned refs) under ScanQA's keys."""
    res = up["scanqa_cleaned_refs"]
    expected = {k.replace("[sqa3d]", "[scanqa]"): v for k, v in res.items() if "_type" not in k}
    assert ours["scanqa"] == expected
    assert ours["scanqa"]["[scanqa] EM1"] != ours["scanqa_compat"]["[scanqa] EM1"]  # the fixture tells them apart


def test_sqa3d_equals_upstream(ours, up):
    assert ours["sqa3d"] == up["sqa3d"]


def test_normalisation_equals_upstream(up):
    assert [clean_answer(s) for s in CLEAN_CASES] == up["clean_answer"]
    assert [list(cs.answer_match(p, refs)) for p, refs in MATCH_CASES] == up["answer_match"]


def test_box_iou_equals_upstream(up):
    assert [box_iou(a, b) for a, b in BOX_CASES] == up["box_iou"]


def test_lookup_builder_equals_upstream(up):
    built = cs.build_unique_multiple_lookup(FIX / "ScanRefer_filtered.json", FIX / "scannetv2-labels.combined.tsv")
    assert built == up["built_lookup"]
    assert built["scene0011_00"] == {"0": 1, "1": 1, "2": 0, "3": 0, "4": 1, "5": 1, "6": 1}  # 3 "others"


# ---------------------------------------------------------------------------------------------------
# by hand


def box(x, y=0.0, z=0.5, sx=1.0, sy=1.0, sz=1.0):
    return [x, y, z, sx, sy, sz]


def attrs(**scenes):
    return {s: {"objects": ["obj"] * len(b), "locs": torch.tensor(b, dtype=torch.float32)} for s, b in scenes.items()}


def pred(scene="s0", gt_id=0, text="", refs=(), type_info=0, pred_id=0, qid=0):
    return {"scene_id": scene, "gt_id": gt_id, "pred_id": pred_id, "qid": qid, "prompt": "", "pred": text,
            "ref_captions": list(refs), "type_info": type_info}


def test_box_iou_by_hand():
    assert box_iou(box(0), box(0.5)) == 0.5 / (1.5 + IOU_EPS)  # overlap 1 x 1 x 0.5
    half = box_iou(box(0), box(0, z=1.0, sz=2.0))  # exact IoU 1/2 ...
    assert half < 0.5 and np.float32(half) == 0.5  # ... below 0.5 with the epsilon, 0.5 again in float32
    assert box_iou(box(0), box(3)) == 0.0
    assert box_iou(box(0, sx=-1.0), box(0)) == box_iou(box(0), box(0))  # a negative size is its interval
    m = box_iou_matrix([box(0), box(0.5)], [box(0), box(0.5), box(9)])
    assert m.shape == (2, 3) and m[0, 0] == m[1, 1] == 1 / (1 + IOU_EPS) and m[0, 1] == m[1, 0]
    with pytest.raises(ValueError, match="boxes_b"):
        box_iou_matrix([box(0)], [[0, 0, 0, 1, 1]])


def test_scanrefer_by_hand():
    gt = attrs(s0=[box(0), box(3)])
    inst = attrs(s0=[box(3), box(0.5), box(0, z=1.0, sz=2.0)])  # id 0 = GT 1, id 1 ~ GT 0 (1/3), id 2 ~ GT 0 (1/2)
    lookup = {"s0": {"0": 0, "1": 1}}
    preds = [
        pred(gt_id=0, text="<OBJ001>"),  # 1/3: @0.25
        pred(gt_id=0, text="<OBJ002>"),  # 1/2 - eps: @0.25 only
        pred(gt_id=0, text="<OBJ007> <OBJ000>"),  # 7 >= 3 skipped, id 0 = GT 1: miss
        pred(gt_id=1, text="nothing"),  # default id 0 = GT 1: hit
        pred(gt_id=1, text="<OBJ3>"),  # no match, id 0: hit
    ]
    got = cs.score_scanrefer(preds, inst, gt, lookup)
    assert got == {
        "[scanrefer] Acc@0.25": 4 / 5, "[scanrefer] Acc@0.50": 2 / 5,
        "[scanrefer] Unique Acc@0.25": 2 / 3, "[scanrefer] Unique Acc@0.50": 0 / 3,
        "[scanrefer] Multiple Acc@0.25": 2 / 2, "[scanrefer] Multiple Acc@0.50": 2 / 2,
    }
    with pytest.warns(UserWarning, match="Multiple"):
        only_unique = cs.score_scanrefer(preds[:1], inst, gt, lookup)
    assert "[scanrefer] Multiple Acc@0.25" not in only_unique


def test_multi3dref_hungarian_by_hand():
    # unit boxes along x: IoU = (1 - d) / (1 + d) for a shift d. P1 (x=.25): GT0 .6, GT1 (x=.54) .5504;
    # P2 (x=-.4): GT0 .4286, GT1 .0309. Greedy P1->GT0 would give one TP@0.25; the optimum P1->GT1,
    # P2->GT0 (sum .979) gives two, and one @0.50 (.5504).
    gt = attrs(s0=[box(0), box(0.54)])
    inst = attrs(s0=[box(0.25), box(-0.4)])
    preds = [
        pred(text="<OBJ000> <OBJ001>", refs=[0, 1], type_info="mt"),  # F1 2*2/4, 2*1/4
        pred(text="<OBJ000><OBJ000>", refs=[0], type_info="st_w_d"),  # repeated: 2 preds, 1 TP: 2/3, 2/3
        pred(text="<OBJ009>", refs=[1], type_info="st_wo_d"),  # invalid id: 0 preds -> 0
        pred(text="No.", refs=[], type_info="zt_w_d"),  # 1
        pred(text="<OBJ001>", refs=[], type_info="zt_wo_d"),  # 0
    ]
    got = cs.score_multi3dref(preds, inst, gt)
    assert got["[multi3dref] mt F1@0.25"] == 1.0 and got["[multi3dref] mt F1@0.50"] == 0.5
    assert got["[multi3dref] st_w_d F1@0.25"] == got["[multi3dref] st_w_d F1@0.50"] == 2 / 3
    assert got["[multi3dref] st_wo_d F1@0.25"] == 0.0
    assert got["[multi3dref] zt_w_d F1@0.50"] == 1.0 and got["[multi3dref] zt_wo_d F1@0.50"] == 0.0
    assert got["[multi3dref] all F1@0.25"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 0) / 5, abs=1e-15)
    assert got["[multi3dref] all F1@0.50"] == pytest.approx((0.5 + 2 / 3 + 0 + 1 + 0) / 5, abs=1e-15)
    assert list(got)[:2] == ["[multi3dref] all F1@0.25", "[multi3dref] all F1@0.50"]


@needs_java
def test_scan2cap_by_hand(scorers):
    """Gating, "sos … eos" wrapping and never-predicted keys, scored with pycocoevalcap directly on
    captions tokenised by hand (lower case, punctuation dropped)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gt = attrs(s0=[box(0), box(3), box(6)])
    inst = attrs(s0=[box(0), box(3.5)])  # id 0 = GT 0 (IoU 1), id 1 ~ GT 1 (1/3)
    corpus = {"s0|0": ["sos The red chair. eos", "sos A chair. eos"], "s0|1": ["sos A small table. eos"],
              "s0|2": ["sos The door. eos"]}
    preds = [pred(gt_id=0, pred_id=0, text="The red chair."), pred(gt_id=1, pred_id=1, text="A small table,\nwooden.")]
    got = cs.score_scan2cap(preds, inst, gt, corpus, scorers=scorers)
    gts = {"s0|0": ["sos the red chair eos", "sos a chair eos"], "s0|1": ["sos a small table eos"],
           "s0|2": ["sos the door eos"]}
    res = {
        "0.25": {"s0|0": ["sos the red chair eos"], "s0|1": ["sos a small table wooden eos"], "s0|2": ["sos eos"]},
        "0.50": {"s0|0": ["sos the red chair eos"], "s0|1": ["sos eos"], "s0|2": ["sos eos"]},
    }
    for thr, r in res.items():
        bleu, _ = Bleu(4).compute_score(gts, r, verbose=0)
        assert [got[f"[scan2cap] Bleu_{k}@{thr}"] for k in range(1, 5)] == bleu
        assert got[f"[scan2cap] ROUGE_L@{thr}"] == Rouge().compute_score(gts, r)[0]
        assert got[f"[scan2cap] CIDEr@{thr}"] == Cider().compute_score(gts, r)[0]
        assert 0 < got[f"[scan2cap] METEOR@{thr}"] < 1
    assert got["[scan2cap] Bleu_1@0.25"] > got["[scan2cap] Bleu_1@0.50"]


def test_scanqa_em_by_hand():
    preds = [
        pred(text="Two.", refs=["2", "Two chairs"]),  # cleaned refs: "two" == "two"; raw: no match at all
        pred(text="brown chair", refs=["Chair", "brown chair"]),  # exact in both
        pred(text="On the left.", refs=["left side"]),  # "onleft" vs "leftside": neither
        pred(text="left", refs=["To the LEFT"]),  # cleaned "to left" contains "left": refined; raw: no
        pred(text="", refs=[""]),  # empty prediction: (0, 0)
    ]
    assert cs.score_scanqa(preds, caption_metrics=False) == {"[scanqa] EM1": 2 / 5, "[scanqa] EM1_refined": 3 / 5}
    assert cs.score_scanqa(preds, caption_metrics=False, compat_ref_overwrite=True) == {
        "[scanqa] EM1": 1 / 5, "[scanqa] EM1_refined": 1 / 5}


def test_sqa3d_em_by_hand():
    preds = [pred(text="Yes.", refs=["yes"], type_info=1), pred(text="no", refs=["Yes"], type_info=1),
             pred(text="3", refs=["three"], type_info="2"), pred(text="the sofa", refs=["sofa bed"], type_info=0)]
    got = cs.score_sqa3d(preds, caption_metrics=False)
    assert got["[sqa3d] EM1"] == 2 / 4 and got["[sqa3d] EM1_refined"] == 3 / 4
    assert got["[sqa3d] EM_type1"] == 1 / (1e-10 + 1 + 1) and got["[sqa3d] EM_type2"] == 1 / (1e-10 + 1)
    assert got["[sqa3d] EM_type0"] == 0.0 and got["[sqa3d] EM_refined_type0"] == 1 / (1e-10 + 1)
    assert got["[sqa3d] EM_type4"] == got["[sqa3d] EM_refined_type5"] == 0.0
    assert len(got) == 2 + 12


def test_answer_match_is_chat_scenes_not_leos():
    assert cs.answer_match("chair", ["brown chair", "chair"]) == (1, 1)
    assert leo_answer_match("chair", ["brown chair", "chair"]) == (0, 1)
    assert cs.answer_match("", ["chair"]) == (0, 0) and leo_answer_match("", ["chair"]) == (0, 1)
    assert cs.clean_prediction("The Brown chair.") == "brown chair"
    assert cs.clean_prediction(".") == ""


def test_object_ids():
    assert cs.object_ids("<OBJ001><OBJ150> <OBJ001>, <OBJ01> <obj002> <OBJ0030>", 100) == [1, 1]
    assert cs.first_object_id("<OBJ150>", 100) == 0 and cs.first_object_id("x <OBJ099>", 100) == 99


def test_fixtures_are_what_make_fixtures_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_chat_scene_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in FIX.iterdir() if p.name != "make_fixtures.py" and p.suffix != ".pyc")
    for name in made:
        if name.endswith(".pt"):
            a, b = torch.load(tmp_path / name), torch.load(FIX / name)
            assert list(a) == list(b)
            assert all(a[k]["objects"] == b[k]["objects"] and torch.equal(a[k]["locs"], b[k]["locs"]) for k in a)
        else:
            assert (tmp_path / name).read_bytes() == (FIX / name).read_bytes(), name


def test_fixture_preds_are_in_evaluate_order():
    for name in ("scanrefer", "multi3dref", "scan2cap", "scanqa", "sqa3d"):
        preds = load(f"preds_{name}.json")
        assert cs.sort_predictions(preds) == preds
        assert all(set(p) == {"scene_id", "gt_id", "pred_id", "qid", "prompt", "pred", "ref_captions", "type_info"}
                   for p in preds)


def test_bad_inputs_name_the_parameter():
    gt, inst = attrs(s0=[box(0)]), attrs(s0=[box(0)])
    with pytest.raises(ValueError, match="preds: expected at least one"):
        cs.score_multi3dref([], inst, gt)
    with pytest.raises(ValueError, match=r"preds\[0\]: missing \['ref_captions'\]"):
        cs.score_multi3dref([{"scene_id": "s0", "pred": "", "type_info": "mt"}], inst, gt)
    with pytest.raises(ValueError, match=r"preds\[0\]\['type_info'\]"):
        cs.score_multi3dref([pred(type_info="st")], inst, gt)
    with pytest.raises(ValueError, match=r"preds\[0\]\['ref_captions'\]: 2 is not an object"):
        cs.score_multi3dref([pred(refs=[2], type_info="st_w_d")], inst, gt)
    with pytest.raises(ValueError, match="scannet_attributes: no entry"):
        cs.score_scanrefer([pred(scene="s9")], {"s9": inst["s0"]}, gt, {"s9": {"0": 0}})
    with pytest.raises(ValueError, match="unique_multiple_lookup"):
        cs.score_scanrefer([pred()], inst, gt, {"s0": {}})
    with pytest.raises(ValueError, match=r"preds\[0\]\['pred_id'\]: -1"):
        cs.score_scan2cap([pred(pred_id=-1)], inst, gt, {"s0|0": ["sos a eos"]})
    with pytest.raises(ValueError, match="corpus: no captions for 's0|0'"):
        cs.score_scan2cap([pred()], inst, gt, {"s0|1": ["sos a eos"]})
    with pytest.raises(ValueError, match=r"preds\[0\]\['type_info'\]: expected an sqa_type"):
        cs.score_sqa3d([pred(refs=["a"], type_info=6)], caption_metrics=False)
    with pytest.raises(TypeError, match=r"preds\[0\]\['pred'\]"):
        cs.score_scanqa([pred(text=None, refs=["a"])], caption_metrics=False)
    with pytest.raises(TypeError, match="instance_attributes"):
        cs.score_multi3dref([pred(type_info="mt")], 3, gt)
