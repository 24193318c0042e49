"""The real Chat-Scene (tiny random weights) on synthetic scenes in Chat-Scene's own file formats.

Upstream code path: ``tests/hosts/upstream.py`` materialises Chat-Scene at its pin (submodule, else the
snapshot in ../shared/upstream) with ``patches/Chat-Scene`` applied; ``chat_scene_build`` builds a tiny
Chat3D through Chat-Scene's own ``__init__`` (vendored LLaMA, peft LoRA, ``<OBJxxx>`` tokens) and saves it
as Chat-Scene's training saves a checkpoint; ``shared.datasets.chat_scene_synthetic`` writes the annotation
folder (features, boxes, the five val json files). ``eval/Chat-Scene/eval_chatscene.py`` builds the config,
loads model and checkpoint, and reads the data with Chat-Scene's ``ValDataset`` + ``val_collate_fn``; then
``Chat3D.evaluate`` (beam 5, as upstream) answers.

References, computed apart from Chat-Scene's code: the features, boxes and texts read straight from the
files; the visual span built by hand from the weights (slot i = [``<OBJ i>`` embedding row, 3D projector of
the L2-normalised feature of object ``assigned_ids[i]``, 2D projector of its image feature]); the answer of
stock transformers 4.39.3 ``LlamaForCausalLM`` (+ the same peft LoRA) generating from the same embeddings
with the same settings, decoded and post-processed here (split at ``</s>``, spaces, slot ids mapped back).

Runs on Chat-Scene's pin, transformers 4.39.3, in an env with torchvision (``scripts/test.sh``:
``PYTHONPATH=.venvs/tf-4.39.3 .venvs/yolo/bin/python -m pytest tests/hosts/test_chat_scene_real.py``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from . import upstream

REQUIRED_MODULES = ("torchvision", "peft", "sentencepiece", "google.protobuf", "plyfile", "trimesh", "scipy")
OBJ = 12  # object slots of the fast model (the released model: 100, see test_the_released_layout_...)


def _environment() -> None:
    import importlib.util

    import transformers

    if transformers.__version__ != "4.39.3":
        upstream.unavailable(f"Chat-Scene pins transformers 4.39.3, this is {transformers.__version__} "
                             "(PYTHONPATH=.venvs/tf-4.39.3 .venvs/yolo/bin/python -m pytest ...)")
    missing = []
    for m in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(m) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(m)
    if missing:
        upstream.unavailable(f"Chat-Scene's imports need {missing} (scripts/setup_test_envs.sh: .venvs/yolo + the "
                             "tf-4.39.3 target)")


# ------------------------------------------------------------------------------------- fixtures
@dataclass
class Env:
    cb: Any  # chat_scene_build
    drv: Any
    tree: Any
    data: Any  # SyntheticScenes
    ckpt: Any
    cfg: Any
    make_dataset: Any
    collate: Any
    model: Any
    workdir: Path
    extra: Dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are microseconds: with several threads on a busy machine OpenMP's
    synchronisation costs orders of magnitude more than the work (measured: 60 s vs 0.7 s for 3 samples)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    _environment()
    tree = upstream.tree_or_skip("Chat-Scene")
    from shared.datasets import write_chat_scene_annotations

    from . import chat_scene_build as cb

    work = tmp_path_factory.mktemp("chat_scene")
    data = write_chat_scene_annotations(work / "annotations", seed=0)
    ckpt = cb.build_checkpoint(tree, work, data.root, max_obj_num=OBJ)
    drv = cb.load_driver()
    args = cb.driver_args(drv, ckpt.llm, data.root, work / "probe", ckpt=ckpt.ckpt, tree=tree, max_obj_num=OBJ)
    cfg, make_dataset, collate = drv.load_data(args, require_patch=cb.is_patched(tree))
    model = drv.load_model(args, cfg, torch.device("cpu"))
    return Env(cb, drv, tree, data, ckpt, cfg, make_dataset, collate, model, work)


class GenerateLog:
    """Records the ``inputs_embeds`` and settings of every ``llama_model.generate`` call Chat3D makes."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, []
        self._orig = model.llama_model.generate

        def generate(*a, **kw):
            self.calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
            out = self._orig(*a, **kw)
            self.calls[-1]["output"] = out.detach().clone()
            return out

        model.llama_model.generate = generate

    def close(self) -> None:
        del self.model.llama_model.generate  # the instance attribute; the class method shows again


def answer(env: Env, model, task: str, index: int):
    """Chat3D.evaluate on annotation ``index`` of ``task`` (the driver's seeded one-sample batch)."""
    bench = env.drv.ChatSceneTask(task, env.make_dataset(task), env.collate, model, [], {}, "cpu", 42, None)
    batch = bench.batch(index)
    log = GenerateLog(model)
    try:
        with torch.no_grad():
            preds = model(**batch, is_eval=True)
    finally:
        log.close()
    assert len(log.calls) == 1 and len(preds) == 1
    return batch, preds[0], log.calls[0]


# --------------------------------------------------------------------------------- the code path
def test_the_driver_builds_chat_scene_s_own_classes(env):
    import dataset.dataset_val
    import models.chat3d
    import models.modeling_llama
    import peft

    tree = env.tree.path.resolve()
    for mod, rel in ((models.chat3d, "models/chat3d.py"), (models.modeling_llama, "models/modeling_llama.py"),
                     (dataset.dataset_val, "dataset/dataset_val.py")):
        assert Path(mod.__file__).resolve() == tree / rel
    m = env.model
    assert type(m) is models.chat3d.Chat3D and isinstance(m.llama_model, peft.PeftModel)
    llama = m.llama_model.base_model.model
    assert type(llama) is models.modeling_llama.LlamaForCausalLM and llama.config._attn_implementation == "eager"
    assert env.make_dataset("scanqa").__class__ is dataset.dataset_val.ValDataset
    assert env.collate is dataset.dataset_val.val_collate_fn
    # run.sh's settings reached Chat3D
    assert (m.max_obj_num, m.add_img_token, m.add_scene_token, m.add_pos_emb, m.bidirection) == (OBJ, True, False, False, False)
    assert m.llama_model.peft_config["default"].r == 16 and m.llama_model.peft_config["default"].lora_alpha == 16
    tok = m.llama_tokenizer
    assert m.objid_end_idx - m.objid_start_idx == OBJ and tok.convert_ids_to_tokens(m.objid_start_idx) == "<OBJ000>"
    assert m.object_proj[0].in_features == 1024 and m.object_img_proj[0].in_features == 1024
    assert [p.name for p in env.tree.patches] == sorted(p.name for p in (upstream.ROOT / "patches" / "Chat-Scene").glob("*.patch"))


def test_the_checkpoint_loads_as_saved_and_bad_ones_are_refused(env, tmp_path):
    saved, loaded = env.ckpt.model.state_dict(), env.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ck = torch.load(env.ckpt.ckpt, map_location="cpu", weights_only=False)
    assert ck["epoch"] == 1 and ck["global_step"] == 3446 and type(ck["config"]).__name__ == "EasyDict"
    frozen = {n for n, p in env.model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(ck["model"])  # tasks/train.py drops the frozen parameters
    # Chat3D computes the fixed prompt embeddings in __init__, before the checkpoint: from the Vicuna's rows
    from safetensors.torch import load_file

    vicuna = load_file(str(env.ckpt.llm / "model.safetensors"))["model.embed_tokens.weight"]
    read = lambda p: "\n".join(x.strip() for x in Path(p).read_text().splitlines())  # noqa: E731
    p_0 = f"{read(env.cfg.model.system_path)} {read(env.cfg.model.instruction_path)} USER: ".split("<REPLACE>")[0]
    ids = env.model.llama_tokenizer(p_0, add_special_tokens=True).input_ids
    assert ids[0] == 1 and torch.equal(env.model.p_0_embed, vicuna[ids])
    assert not torch.equal(vicuna, loaded["llama_model.base_model.model.model.embed_tokens.weight"][: vicuna.shape[0]])

    drv = env.drv
    bad = dict(ck["model"])
    key = "object_proj.0.weight"
    bad[key] = bad[key][:, :512]
    torch.save({"model": bad}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"^ckpt: 1 tensors of .*object_proj\.0\.weight: file \(64, 512\) vs model \(64, 1024\)"):
        drv.load_checkpoint(env.model, str(tmp_path / "shape.pth"))
    torch.save({"model": {k: v for k, v in ck["model"].items() if "lora_B" not in k}}, tmp_path / "lora.pth")
    with pytest.raises(ValueError, match=r"^ckpt: .* lacks 28 trainable parameters of the model, e\.g\. \['llama_model\..*lora_B"):
        drv.load_checkpoint(env.model, str(tmp_path / "lora.pth"))
    torch.save({"model": {**ck["model"], "scene_proj.weight": torch.zeros(2)}}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"^ckpt: .* 1 keys the model does not have, e\.g\. \['scene_proj\.weight'\]"):
        drv.load_checkpoint(env.model, str(tmp_path / "extra.pth"))
    before = {k: v.clone() for k, v in env.model.state_dict().items()}
    assert drv.load_checkpoint(env.model, str(tmp_path / "extra.pth"), ignore_unexpected=True)["unexpected"] == ["scene_proj.weight"]
    assert all(torch.equal(before[k], v) for k, v in env.model.state_dict().items())


def test_valdataset_reads_the_synthetic_files(env):
    """Features, boxes, prompt and references of a sample are those in the files; the slot permutation is
    torch.randperm(max_obj_num) under the annotation's seed."""
    root = env.data.root
    feats = torch.load(root / "scannet_mask3d_uni3d_feats.pt")
    img = torch.load(root / "scannet_mask3d_videofeats.pt")
    attrs = torch.load(root / "scannet_mask3d_val_attributes.pt")
    for task, index in (("scanrefer", 4), ("multi3dref", 1), ("scan2cap", 2), ("scanqa", 0), ("sqa3d", 5)):
        anno = json.loads(Path(env.cfg.val_file_dict[task][3]).read_text())[index]
        bench = env.drv.ChatSceneTask(task, env.make_dataset(task), env.collate, None, [], {}, "cpu", 42, None)
        batch = bench.batch(index)
        sid = anno["scene_id"]
        n = env.data.instances[sid]
        assert batch["scene_feat"].shape == (1, OBJ, 1024) and batch["scene_img_feat"].dtype == torch.float32
        for k in range(OBJ):
            want = feats[f"{sid}_{k:02}"] if k < n else torch.zeros(1024)
            want_img = img[f"{sid}_{k:02}"].float() if k < n else torch.zeros(1024)
            assert torch.equal(batch["scene_feat"][0, k], want) and torch.equal(batch["scene_img_feat"][0, k], want_img)
        assert torch.equal(batch["scene_locs"][0], attrs[sid]["locs"]) and bool(batch["scene_mask"].all())
        torch.manual_seed(env.drv.sample_seed(42, task, index))
        assert torch.equal(batch["assigned_ids"][0], torch.randperm(OBJ))
        rec = env.drv.prediction_record(batch, "x")
        assert (rec["scene_id"], rec["gt_id"], rec["prompt"], rec["ref_captions"]) == (
            sid, anno["obj_id"], anno["prompt"], anno["ref_captions"])
        assert rec["pred_id"] == anno.get("pred_id", 0)
        assert rec["type_info"] == anno.get("sqa_type", anno.get("eval_type", 0))


# ----------------------------------------------------------------------------------- references
def visual_span_by_hand(env: Env, model, batch) -> torch.Tensor:
    """(3 * max_obj_num, d): slot i = [<OBJ i> embedding row, object_proj(normalize(feat[assigned[i]])),
    object_img_proj(normalize(img_feat[assigned[i]]))], from the batch's raw features."""
    emb = model.llama_model.base_model.model.model.embed_tokens.weight
    ids = batch["assigned_ids"][0]
    feat = torch.nn.functional.normalize(batch["scene_feat"][0], dim=-1)
    img = torch.nn.functional.normalize(batch["scene_img_feat"][0], dim=-1)
    rows = []
    for i in range(ids.numel()):
        rows += [emb[model.objid_start_idx + i], model.object_proj(feat[ids[i]]), model.object_img_proj(img[ids[i]])]
    return torch.stack(rows)


def stock_llm(model):
    """Stock transformers 4.39.3 LlamaForCausalLM + the same peft LoRA, with the model's LLM weights."""
    import peft
    import transformers

    vendored = model.llama_model
    cfg = transformers.LlamaConfig(**{k: v for k, v in vendored.config.to_dict().items()
                                      if k not in ("architectures", "_name_or_path")})
    cfg._attn_implementation = "eager"
    stock = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), vendored.peft_config["default"])
    stock.load_state_dict(vendored.state_dict(), strict=True)
    return stock.eval()


def recover_by_hand(text: str, assigned: List[int]) -> str:
    """Slot ids in ``text`` back to object ids (ids outside the slots do not occur in the cases checked)."""
    return re.sub(r"<OBJ(\d{3})>", lambda m: f"<OBJ{assigned[int(m.group(1))]:03}>", text)


@pytest.mark.parametrize("task,index", [("scanrefer", 0), ("scan2cap", 3), ("sqa3d", 2)])
def test_evaluate_answers_from_the_layout_and_equals_stock_transformers(env, task, index):
    model = env.model
    batch, pred, call = answer(env, model, task, index)
    emb = call["inputs_embeds"][0]
    p0, p1 = model.p_0_embed, model.p_1_embed
    vis_start, vis_len = p0.shape[0], 3 * OBJ
    # [p_0 | 3 tokens per object slot | p_1 | " {prompt} ASSISTANT: " with object ids as slot ids]
    slot_of = {int(o): s for s, o in enumerate(batch["assigned_ids"][0].tolist())}
    prompt = re.sub(r"<OBJ(\d{3})>", lambda m: f"<OBJ{slot_of[int(m.group(1))]:03}>", batch["custom_prompt"][0])
    ids = model.llama_tokenizer(f" {prompt} ASSISTANT: ", add_special_tokens=False).input_ids
    assert emb.shape[0] == vis_start + vis_len + p1.shape[0] + len(ids)
    assert torch.equal(emb[:vis_start], p0) and torch.equal(emb[vis_start + vis_len:][: p1.shape[0]], p1)
    with torch.no_grad():
        assert torch.allclose(emb[vis_start:vis_start + vis_len], visual_span_by_hand(env, model, batch), atol=1e-6, rtol=0)
        text_rows = model.llama_model.base_model.model.model.embed_tokens(torch.tensor(ids))
    assert torch.equal(emb[vis_start + vis_len + p1.shape[0]:], text_rows)
    assert (call["num_beams"], call["max_new_tokens"], call["repetition_penalty"], call["min_length"]) == (5, 8, 3.0, 1)
    # the same embeddings through stock transformers: the same tokens, decoded and post-processed by hand
    with torch.no_grad():
        ref = stock_llm(model).generate(inputs_embeds=call["inputs_embeds"], max_new_tokens=8, num_beams=5,
                                        min_length=1, repetition_penalty=3.0, length_penalty=1, temperature=1.0)
    assert torch.equal(call["output"], ref)
    text = model.llama_tokenizer.decode(ref[0]).split("</s>")[0].replace("  ", " ").replace(" .", ".").strip()
    assert pred == recover_by_hand(text, batch["assigned_ids"][0].tolist()) and pred


def test_the_released_layout_100_objects_300_tokens(env):
    """max_obj_num = 100 as released: 300 visual tokens from len(p_0) on, slot ids <OBJ000>..<OBJ099> in
    order, 3 tokens per slot also for the slots past the scene's instances (zero features). With the real
    LLaMA tokenizer len(p_0) is 45 (Fast3D's fast_v_sys_length); with this test tokenizer it is whatever
    p_0 encodes to, which is why the span is read off p_0_embed."""
    drv, cb = env.drv, env.cb
    ck = cb.build_checkpoint(env.tree, env.workdir / "obj100", env.data.root, max_obj_num=100, llm=env.ckpt.llm)
    args = cb.driver_args(drv, ck.llm, env.data.root, env.workdir / "probe100", ckpt=ck.ckpt, tree=env.tree,
                          max_obj_num=100, max_new_tokens=4)
    cfg, make_dataset, collate = drv.load_data(args, require_patch=cb.is_patched(env.tree))
    model = drv.load_model(args, cfg, torch.device("cpu"))
    sub = Env(cb, drv, env.tree, env.data, ck, cfg, make_dataset, collate, model, env.workdir)
    batch, pred, call = answer(sub, model, "scanqa", 1)
    assert batch["scene_feat"].shape == (1, 100, 1024) and sorted(batch["assigned_ids"][0].tolist()) == list(range(100))
    emb = call["inputs_embeds"][0]
    vis_start = model.p_0_embed.shape[0]
    span = emb[vis_start:vis_start + 300]
    ids = model.llama_tokenizer.convert_tokens_to_ids([f"<OBJ{i:03}>" for i in range(100)])
    table = model.llama_model.base_model.model.model.embed_tokens.weight
    assert ids == list(range(model.objid_start_idx, model.objid_start_idx + 100))
    assert torch.equal(span[0::3], table[ids])
    with torch.no_grad():
        assert torch.allclose(span, visual_span_by_hand(sub, model, batch), atol=1e-6, rtol=0)
        zero = model.object_proj(torch.zeros(1024))  # normalize(0) = 0: an empty slot still takes 3 tokens
    empty = [s for s, o in enumerate(batch["assigned_ids"][0].tolist()) if o >= env.data.instances[batch["scene_id"][0]]]
    assert len(empty) == 100 - env.data.instances[batch["scene_id"][0]]
    assert all(torch.allclose(span[3 * s + 1], zero, atol=1e-6, rtol=0) for s in empty)
    assert torch.equal(emb[vis_start + 300:vis_start + 300 + model.p_1_embed.shape[0]], model.p_1_embed)
    assert isinstance(pred, str)


# ------------------------------------------------------------------------------------ the driver
FAST = ("scanrefer", "multi3dref")  # no Java scorer: the runs that check the loop, not the captions


class ForwardLog:
    """Every ``model(**batch, is_eval=True)`` the driver makes inside its ``shared.prune`` session: the
    batch, the predictions and the session's record of that sample's prefill."""

    def __init__(self, model) -> None:
        self.calls: List[Dict[str, Any]] = []
        self._h = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, _args, kwargs, output):
        from shared.hosts import session_of

        session = session_of(module)
        self.calls.append({"batch": dict(kwargs), "output": output,
                           "record": session.last if session is not None else None,
                           "records": len(session.records) if session is not None else 0})

    def close(self) -> None:
        self._h.remove()


@dataclass
class Run:
    summary: Any
    calls: List[Dict[str, Any]]
    records: Dict[str, List[Dict[str, Any]]]
    out: Path


def run_driver(env: Env, name: str, *flags: str, tasks=FAST, limit=None, run_env=None, out=None,
               model=None, **overrides) -> Run:
    """The driver's ``run`` as its ``main`` calls it (CPU, the loaded tiny model)."""
    if name in env.extra and out is None:
        return env.extra[name]
    out = out or env.workdir / f"run-{name}"
    extra = ["--tasks", *tasks] + (["--limit", str(limit)] if limit else [])
    args = env.cb.driver_args(env.drv, env.ckpt.llm, env.data.root, out, *extra, *flags, ckpt=env.ckpt.ckpt,
                              tree=env.tree, max_obj_num=OBJ)
    for k, v in overrides.items():
        setattr(args, k, v)
    model = model or env.model
    log = ForwardLog(model)
    try:
        summary = env.drv.run(args, model, env.make_dataset, env.collate, "cpu", env=run_env or {})
    finally:
        log.close()
    records = {}
    for t in args.tasks:
        path = Path(out) / f"{t}.jsonl"
        records[t] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    run = Run(summary, log.calls, records, Path(out))
    if name:
        env.extra[name] = run
    return run


def _strip(recs, drop=("seconds",)):
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def test_a_vanilla_run_answers_like_chat3d_and_scores_every_benchmark(env):
    run = run_driver(env, "vanilla", tasks=("all",))
    n = {t: env.data.counts[t] for t in env.drv.TASKS}
    assert [len(run.records[t]) for t in env.drv.TASKS] == [n[t] for t in env.drv.TASKS]
    assert len(run.calls) == sum(n.values())  # one Chat3D call per annotation, in annotation order
    calls = iter(run.calls)
    model = env.model
    for t in env.drv.TASKS:
        bench = env.drv.ChatSceneTask(t, env.make_dataset(t), env.collate, model, [], {}, "cpu", 42, None)
        annos = json.loads(Path(env.cfg.val_file_dict[t][3]).read_text())
        for i, rec in enumerate(run.records[t]):
            call = next(calls)
            assert rec["key"] == str(i) and call["batch"]["sample_key"] == [f"{t}:{i}"]
            # one prefill record per sample, keyed by the sample
            assert call["records"] == 1 and call["record"].host["key"] == f"{t}:{i}"
            batch = bench.batch(i)
            assert torch.equal(call["batch"]["assigned_ids"], batch["assigned_ids"])
            assert rec["pred"] == call["output"][0]
            if i == 0:
                with torch.no_grad():  # outside any session: Chat3D's own loop
                    assert model(**batch, is_eval=True)[0] == rec["pred"]
            assert (rec["scene_id"], rec["gt_id"], rec["prompt"], rec["ref_captions"]) == (
                annos[i]["scene_id"], annos[i]["obj_id"], annos[i]["prompt"], annos[i]["ref_captions"])
            # the accounting: every layer saw the 3 * OBJ object tokens; text = p_0 + p_1 + the prompt
            slot_of = {int(o): s for s, o in enumerate(rec["assigned_ids"])}
            prompt = re.sub(r"<OBJ(\d{3})>", lambda m: f"<OBJ{slot_of[int(m.group(1))]:03}>", rec["prompt"])
            text = len(model.p_0_embed) + len(model.p_1_embed) + len(
                model.llama_tokenizer(f" {prompt} ASSISTANT: ", add_special_tokens=False).input_ids)
            assert rec["visual_per_layer"] == [3 * OBJ] * 4 and rec["visual_tokens"] == 3 * OBJ
            assert rec["text_tokens"] == text and rec["pruning_ratio"] == 0.0
        preds = json.loads((run.out / f"preds_{t}.json").read_text())
        fields = ("scene_id", "gt_id", "pred_id", "qid", "prompt", "pred", "ref_captions", "type_info")
        want = sorted(({k: r[k] for k in fields} for r in run.records[t]),
                      key=lambda x: f"{x['scene_id']}_{x['gt_id']:03}_{x['qid']}")
        assert preds == want
    b = run.summary["benchmarks"]
    # ScanRefer by hand: the first <OBJxxx> below the scene's instance count (else 0) picks a Mask3D box
    from shared.datasets.chat_scene_synthetic import box_iou_3d

    inst = torch.load(env.data.root / "scannet_mask3d_val_attributes.pt")
    gt = torch.load(env.data.root / "scannet_val_attributes.pt")
    ious = []
    for r in run.records["scanrefer"]:
        locs = inst[r["scene_id"]]["locs"]
        ids = [int(x) for x in re.findall(r"<OBJ(\d{3})>", r["pred"]) if int(x) < locs.shape[0]]
        ious.append(box_iou_3d(locs[ids[0] if ids else 0].numpy(), gt[r["scene_id"]]["locs"][r["gt_id"]].numpy()))
    for thr, key in ((0.25, "[scanrefer] Acc@0.25"), (0.5, "[scanrefer] Acc@0.50")):
        assert b["scanrefer"]["metrics"][key] == pytest.approx(100.0 * sum(i >= thr for i in ious) / len(ious))
    for t, cols in env.drv.COLUMNS.items():
        assert b[t]["n"] == n[t] and b[t]["skipped"] == 0
        for _, key in cols:
            assert 0.0 <= b[t]["metrics"][key] <= 100.0
    table = (run.out / "table.md").read_text()
    assert "| ScanRefer Acc@0.5 |" in table and "| SQA3D EM-R |" in table and "| random |" in table


def test_fast3d_keeps_the_top_objects_of_the_given_scores(env, tmp_path):
    """--method fast3d with per-annotation scores (Fast3D's prediction-file format): from layer K every
    layer sees the kept triplets; they are the slots holding the objects with the highest scores."""
    gen = torch.Generator().manual_seed(5)
    files = {}
    for t in FAST:
        path = tmp_path / f"infer_attn_maps_val_{t}.pt"
        torch.save([{"a_map": torch.randn(OBJ, generator=gen)} for _ in range(env.data.counts[t])], path)
        files[t] = path
    flags = ("--method", "fast3d", "--method-args", "layer=1", "keep=9",
             "--object-scores", *[f"{t}={p}" for t, p in files.items()])
    for ident in (False, True):
        run = run_driver(env, f"fast3d-{ident}", *flags, *(("--identity-object-ids",) if ident else ()), limit=3)
        calls = iter(run.calls)
        for t in FAST:
            scores = torch.load(files[t])
            for i, rec in enumerate(run.records[t]):
                call = next(calls)
                assert rec["visual_per_layer"] == [3 * OBJ, 9, 9, 9] and rec["pruning_ratio"] == pytest.approx(0.5625)
                assigned = torch.tensor(rec["assigned_ids"])
                assert (assigned.tolist() == list(range(OBJ))) == ident
                by_slot = scores[i]["a_map"][assigned]
                top = sorted(int(s) for s in torch.topk(by_slot, 3).indices)
                start = len(env.model.p_0_embed)
                want = [start + 3 * s + g for s in top for g in range(3)]
                layer, kept = call["record"].stats.stages[-1]
                assert layer == 1 and all(k.tolist() == want for k in kept)  # every beam row
    assert run.summary["settings"]["identity_object_ids"] is True
    assert "| identity |" in (run.out / "table.md").read_text()


def test_a_killed_run_resumes_and_a_finished_one_does_no_work(env, monkeypatch):
    base = run_driver(env, "base-fast", limit=4)
    out = env.workdir / "resume"
    calls = []
    original = type(env.model).forward

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(type(env.model), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_driver(env, "", limit=4, out=out)
    assert [json.loads(x)["key"] for x in (out / "multi3dref.jsonl").read_text().splitlines()] == ["0"]
    calls.clear()
    run = run_driver(env, "", limit=4, out=out)
    assert len(calls) == 3  # multi3dref 1..3 only
    assert {t: _strip(r) for t, r in run.records.items()} == {t: _strip(r) for t, r in base.records.items()}
    calls.clear()
    args = env.cb.driver_args(env.drv, env.ckpt.llm, env.data.root, out, "--tasks", *FAST, "--limit", "4",
                              ckpt=env.ckpt.ckpt, tree=env.tree, max_obj_num=OBJ)
    assert env.drv.pending(args, env.make_dataset) == 0  # main() would not even load the model
    run_driver(env, "", limit=4, out=out)
    assert calls == []
    assert run.summary["benchmarks"]["scanrefer"]["metrics"] == base.summary["benchmarks"]["scanrefer"]["metrics"]


def test_a_sharded_run_merges_to_the_single_process_result(env):
    base = run_driver(env, "base-fast", limit=4)
    flags = ("--method", "fastv", "--method-args", "layer=2", "keep=9")
    single = run_driver(env, "fastv-single", *flags)
    out = env.workdir / "sharded"
    for rank in (1, 0):
        assert run_driver(env, "", *flags, out=out, run_env={"RANK": str(rank), "WORLD_SIZE": "2",
                                                             "LOCAL_RANK": str(rank)}).summary is None
    from shared.runio import shard_path

    shards = {t: [[json.loads(x)["key"] for x in shard_path(out / f"{t}.jsonl", r, 2).read_text().splitlines()]
                  for r in (0, 1)] for t in FAST}
    for t, (a, b) in shards.items():  # contiguous halves, nothing padded or repeated
        assert a + b == [str(i) for i in range(env.data.counts[t])] and len(a) - len(b) in (0, 1)
    merged = run_driver(env, "", *flags, out=out, merge_only=True,
                        run_env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert merged.calls == []
    assert {t: _strip(r) for t, r in merged.records.items()} == {t: _strip(r) for t, r in single.records.items()}
    for t in FAST:
        assert merged.summary["benchmarks"][t]["metrics"] == single.summary["benchmarks"][t]["metrics"]
        assert merged.summary["benchmarks"][t]["n"] == env.data.counts[t]
    assert any(r["visual_per_layer"] != s["visual_per_layer"] for r, s in zip(single.records["scanrefer"],
                                                                               base.records["scanrefer"]))
    env.drv.main(["table", "--runs", str(base.out), str(out), "--out", str(env.workdir / "combined")])
    rows = (env.workdir / "combined.md").read_text().splitlines()
    assert rows[2].startswith("| Chat-Scene | custom | random | 0.0 | 36.0 |")
    assert rows[3].startswith("| Chat-Scene + FastV(keep=9) | custom | random | 37.5 | 22.5 |")


def test_other_settings_are_refused_and_a_failing_sample_can_be_skipped(env, tmp_path):
    run_driver(env, "base-fast", limit=4)
    out = env.workdir / "run-base-fast"
    for flags, field_ in ((("--seed", "1"), "seed"), (("--identity-object-ids",), "identity_object_ids"),
                          (("--method", "fastv", "--method-args", "layer=2", "keep=9"), "methods"),
                          (("--preset", "fast3d"), "protocol")):
        with pytest.raises(ValueError, match=rf"^out: .*other settings .*'{field_}'"):
            run_driver(env, "", *flags, limit=4, out=out)
    # an annotation whose scene has no features: raised by default, recorded with --on-error skip
    import shutil

    data = tmp_path / "annotations"
    shutil.copytree(env.data.root, data)
    path = data / "scanrefer_mask3d_val.json"
    annos = json.loads(path.read_text())
    path.write_text(json.dumps(annos[:2] + [dict(annos[0], scene_id="scene0999_00")]))
    args = env.cb.driver_args(env.drv, env.ckpt.llm, data, tmp_path / "probe", ckpt=env.ckpt.ckpt, tree=env.tree,
                              max_obj_num=OBJ)
    _, make_dataset, collate = env.drv.load_data(args)
    for on_error in ("raise", "skip"):
        a = env.cb.driver_args(env.drv, env.ckpt.llm, data, tmp_path / on_error, "--tasks", "scanrefer",
                               "--on-error", on_error, ckpt=env.ckpt.ckpt, tree=env.tree, max_obj_num=OBJ)
        if on_error == "raise":
            with pytest.raises(KeyError, match="scene0999_00"):
                env.drv.run(a, env.model, make_dataset, collate, "cpu", env={})
            continue
        summary = env.drv.run(a, env.model, make_dataset, collate, "cpu", env={})
        recs = [json.loads(x) for x in (tmp_path / "skip" / "scanrefer.jsonl").read_text().splitlines()]
        assert [("skipped" in r) for r in recs] == [False, False, True] and "KeyError" in recs[2]["skipped"]
        assert (summary["benchmarks"]["scanrefer"]["n"], summary["benchmarks"]["scanrefer"]["skipped"]) == (2, 1)


def test_help_needs_no_gpu_and_no_checkout():
    import os
    import subprocess
    import sys

    e = {**os.environ, "PYTHON": sys.executable, "NGPUS": "0"}
    r = subprocess.run(["bash", str(upstream.ROOT / "eval" / "Chat-Scene" / "eval.sh"), "--help"], capture_output=True,
                       text=True, env=e, timeout=120)  # the script's header, then the driver's own --help
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Chat-Scene on its five benchmarks") and "--identity-object-ids" in r.stdout
    r = subprocess.run(["bash", str(upstream.ROOT / "eval" / "Chat-Scene" / "eval.sh"), "scanrefer", "--out", "x"],
                       capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 1 and "no GPU" in r.stderr


# ------------------------------------------------------------------------ pruning on the real host
def _session_answer(env: Env, methods, task: str, index: int, identity: bool = False, **options):
    """Chat3D.evaluate on one annotation inside ``shared.prune(model, *methods, host="chat_scene")``."""
    import shared

    bench = env.drv.ChatSceneTask(task, env.make_dataset(task), env.collate, env.model, [], {}, "cpu", 42, None,
                                  identity)
    batch = bench.batch(index)
    log = GenerateLog(env.model)
    try:
        with torch.no_grad(), shared.prune(env.model, *methods, host="chat_scene", **options) as session:
            pred = env.model(**batch, is_eval=True)[0]
    finally:
        log.close()
    return batch, pred, log.calls[0], session


@pytest.mark.parametrize("label", [label for label, _ in __import__("shared.apps.matrix", fromlist=["ROWS"]).ROWS])
def test_matrix_cell_on_chat_scene(env, label):
    """Each row of ``python -m shared.apps.matrix`` on the real patched Chat-Scene (beam 5): a ✔ cell keeping
    every visual token generates exactly what Chat3D generates without a session, and a pruning config
    follows its schedule on every beam row; a ✘ cell is refused naming the need."""
    from dataclasses import replace

    import shared
    from shared.apps import matrix
    from shared.needs import MissingNeed

    method = dict(matrix.ROWS)[label]
    cell = matrix.cell(method, "chat_scene")
    if cell.startswith("✘"):
        need = cell[2:].split(",")[0]
        with pytest.raises(MissingNeed, match=rf"^method: {method.name} needs .*'{need}'.*host 'chat_scene'"):
            with shared.prune(env.model, method, host="chat_scene"):
                pass
        return
    n = 3 * OBJ
    scores = {"object_scores": lambda key: torch.linspace(-1, 1, OBJ).roll(len(key) % OBJ)}
    layers = env.model.llama_model.config.num_hidden_layers
    full = {"fastv": lambda m: replace(m, keep=None, keep_ratio=1.0), "random": lambda m: replace(m, keep=None, keep_ratio=1.0),
            "pdrop": lambda m: replace(m, ratio=1.0), "fast3d": lambda m: replace(m, keep=n),
            "adatoken3d": lambda m: matrix.adatoken_keep_all(layers),
            "lvlm_csp": lambda m: replace(m, cluster_tokens=n, prune_tokens=n)}[method.name](method)
    small = (replace(method, cluster_tokens=12, prune_tokens=6) if method.name == "lvlm_csp"
             else matrix.adatoken_row(layers) if method.name == "adatoken3d" else method)
    batch, stock, _ = answer(env, env.model, "scanqa", 1)
    _, pred, call, session = _session_answer(env, [full], "scanqa", 1, **scores)
    assert pred == stock, f"{label}: keeping every object token changed the answer"
    assert session.last.stats.visual.shape[0] == 5  # one row per beam
    _, _, _, session = _session_answer(env, [small], "scanqa", 1, **scores)
    vis = session.last.stats.visual
    layers = vis.shape[1]
    want = small.schedule(n, layers, int(vis[0, 0])) if method.name == "lvlm_csp" else small.schedule(n, layers)
    assert all(row.tolist() == want for row in vis)


def test_canonical_fast3d_equals_key_masking_of_the_same_objects(env):
    """Physical dropping (canonical Fast3D: the pruned tokens leave the sequence at layer K, KV cache and
    5 beams) and the authors' key masking with the same static object selection (compat oracle rule: every
    token computed, pruned keys masked from layer K) are two mechanisms for one computation on the kept
    tokens: Chat3D.evaluate generates the same answer under both, for K = 0 (SAP) and K = 2; compat
    records full compute, canonical the drop."""
    from shared import Fast3D
    from shared.methods.fast3d_compat import compat

    gen = torch.Generator().manual_seed(11)
    table = {}

    def scores(key):
        if key not in table:
            table[key] = torch.randn(OBJ, generator=gen)
        return table[key]

    n = 3 * OBJ
    for method in (Fast3D(layer=0, alpha=0.5), Fast3D(layer=2, keep=12)):
        for task, index in (("scanqa", 0), ("scanrefer", 2), ("sqa3d", 1)):
            _, canon, _, s1 = _session_answer(env, [method], task, index, identity=True, object_scores=scores)
            _, masked, _, s2 = _session_answer(env, [compat(method)], task, index, identity=True, object_scores=scores)
            assert canon == masked, f"{method} on {task}:{index}: {canon!r} vs {masked!r}"
            kept = s1.last.info[0]["budget"]
            layers = s1.last.stats.visual.shape[1]
            assert s1.last.stats.visual[0].tolist() == [n] * method.layer + [kept] * (layers - method.layer)
            assert s2.last.stats.visual[0].tolist() == [n] * layers  # compat saves nothing
            if method.alpha is not None:
                from shared.methods.fast3d import sap_object_counts

                key = s1.last.host["key"]
                assert kept == 3 * int(sap_object_counts(scores(key), 0.5))


def test_compat_and_online_gap_through_the_driver(env, tmp_path):
    """``--compat fast3d`` (the authors' semantics) gives the canonical run's answers for a static GAP
    selection under Fast3D's protocol while computing every token; ``--gap-checkpoint`` runs a GAP network
    online inside each sample's forward and keeps its top objects; the Fast3D-layout table puts Score
    Ratios against our vanilla run and the README's rows side by side."""
    from tests.fast3d_tiny import tiny_gap_config, write_roberta

    from shared.methods.fast3d_gap import GAPNet, GapScorer, load_gap, load_text_encoder

    gen = torch.Generator().manual_seed(3)
    files = {}
    for t in FAST:
        files[t] = tmp_path / f"infer_attn_maps_val_{t}.pt"
        torch.save([{"a_map": torch.randn(OBJ, generator=gen)} for _ in range(env.data.counts[t])], files[t])
    flags = ("--method", "fast3d", "--method-args", "layer=1", "keep=9",
             "--object-scores", *[f"{t}={p}" for t, p in files.items()])
    canon = run_driver(env, "fast3d-preset", *flags, "--preset", "fast3d", limit=3)
    comp = run_driver(env, "fast3d-compat", *flags, "--compat", "fast3d", limit=3)
    assert comp.summary["settings"]["protocol"] == "compat-fast3d"
    assert comp.summary["settings"]["scanqa_ref_overwrite"] is True
    for t in FAST:
        assert [r["pred"] for r in comp.records[t]] == [r["pred"] for r in canon.records[t]]
        assert all(r["visual_per_layer"] == [3 * OBJ] * 4 for r in comp.records[t])
        assert all(r["visual_per_layer"] == [3 * OBJ, 9, 9, 9] for r in canon.records[t])

    # online GAP: a tiny random GAP over the scene's 1024-d features, RoBERTa from a local folder
    rob = write_roberta(str(tmp_path / "roberta"))
    enc, tok = load_text_encoder(rob)
    torch.manual_seed(0)
    net = GAPNet(tiny_gap_config(n_obj=OBJ, feat=1024, img=1024), enc).eval()
    ckpt = tmp_path / "gap.pth"
    torch.save({"model_state_dict": net.state_dict(), "gap_config": net.config.to_dict()}, ckpt)
    online = run_driver(env, "fast3d-gap", "--method", "fast3d", "--method-args", "layer=0", "alpha=0.4",
                        "--gap-checkpoint", str(ckpt), "--roberta", rob, limit=2)
    scorer = GapScorer(*load_gap(ckpt, rob))
    calls = iter(online.calls)
    for t in FAST:
        for rec in online.records[t]:
            call = next(calls)
            b = call["batch"]
            logits = scorer(b["custom_prompt"][0], b["scene_feat"][0], b["scene_img_feat"][0], b["scene_locs"][0])
            from shared.methods.fast3d import sap_object_counts

            k = int(sap_object_counts(logits, 0.4))
            assert rec["selection"]["scores_from"] == "gap" and rec["selection"]["objects_kept"] == k
            assert rec["visual_per_layer"] == [3 * k] * 4 and rec["selection"]["gap_seconds"] > 0
            by_slot = logits[torch.tensor(rec["assigned_ids"])]
            top = sorted(int(s) for s in torch.sort(by_slot, descending=True, stable=True).indices[:k])
            start = len(env.model.p_0_embed)
            assert call["record"].stats.stages[-1][1][0].tolist() == [start + 3 * s + g for s in top for g in range(3)]
    assert online.summary["settings"]["gap_checkpoint"] == str(ckpt.resolve())
    # GAP's own FLOPs, counted per call, join the table's TFLOPs
    from shared.methods.fast3d_gap import gap_cost

    counting = GapScorer(*load_gap(ckpt, rob), count_flops=True)
    b = online.calls[0]["batch"]
    counting(b["custom_prompt"][0], b["scene_feat"][0], b["scene_img_feat"][0], b["scene_locs"][0])
    first = online.records[FAST[0]][0]["selection"]["gap_flops"]
    assert first == counting.last_flops > 0
    per = env.drv.per_sample_pruning(online.out)
    every = [r["selection"]["gap_flops"] for t in FAST for r in online.records[t]]
    assert per["gap_flops"] == pytest.approx(sum(every) / len(every))

    vanilla = run_driver(env, "vanilla-fast-3", limit=3)
    header, rows, notes = env.drv.fast3d_table([vanilla.summary, canon.summary, comp.summary],
                                               [env.drv.per_sample_pruning(r.out) for r in (vanilla, canon, comp)])
    assert not any(r[0].startswith("  Fast3D README: w/") for r in rows)  # K=1 R=9: the README has no such row
    # compat configs map to the README row of their canonical method; extracted attention maps to none
    assert env.drv.paper_row({"methods": [{"name": "fast3d_compat", "rule": "oracle", "layer": 2, "keep": 15,
                                           "alpha": None}]})["row"] == "fast3d_gap_90"
    assert env.drv.paper_row({"methods": [{"name": "fast3d", "layer": 2, "keep": 15, "alpha": None,
                                           "score_kind": "attention"}]}) is None
    assert header[2:7] == ["ScanRefer Acc@0.5", "Multi3dRefer F1@0.5", "Scan2Cap B-4@0.5", "ScanQA B-4", "SQA3D EM-R"]
    assert rows[0][0] == "Chat-Scene" and rows[1][0].startswith("  Fast3D README: Chat-Scene")
    assert rows[1][7] == "100.00"  # the README's vanilla against itself
    # FAST runs have no Scan2Cap/ScanQA/SQA3D: no Score Ratio is claimed for them
    assert rows[0][7] == "–" and "no vanilla" not in notes[0]
    assert online.summary["settings"]["label"].endswith("[GAP online]")
    assert online.summary["settings"]["methods"][0]["scorer"] is None  # recorded by gap_checkpoint instead

    # online GAP on 2 ranks, then --merge-only (which loads no GAP): the same run.json, the one-process records
    gap_flags = ("--method", "fast3d", "--method-args", "layer=0", "alpha=0.4", "--gap-checkpoint", str(ckpt),
                 "--roberta", rob)
    out = tmp_path / "gap-sharded"
    for rank in (1, 0):
        run_driver(env, "", *gap_flags, out=out, limit=2,
                   run_env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    merged = run_driver(env, "", *gap_flags, out=out, limit=2, merge_only=True,
                        run_env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})

    def plain(recs):
        return [{k: ({a: b for a, b in v.items() if a != "gap_seconds"} if k == "selection" else v)
                 for k, v in r.items() if k != "seconds"} for r in recs]

    assert {t: plain(r) for t, r in merged.records.items()} == {t: plain(r) for t, r in online.records.items()}

    # GAP inference files keyed by annotation index (the authors' and `fast3d_train predict`'s format) give
    # the same run as the list format
    as_dict = {}
    for t in FAST:
        as_dict[t] = tmp_path / f"dict_{t}.pt"
        torch.save({i: e for i, e in enumerate(torch.load(files[t]))}, as_dict[t])
    keyed = run_driver(env, "fast3d-dict", "--method", "fast3d", "--method-args", "layer=1", "keep=9",
                       "--object-scores", *[f"{t}={p}" for t, p in as_dict.items()], "--preset", "fast3d", limit=3)
    assert [r["pred"] for t in FAST for r in keyed.records[t]] == [r["pred"] for t in FAST for r in canon.records[t]]
    torch.save({0: torch.load(files[FAST[0]])[0]}, as_dict[FAST[0]])
    with pytest.raises(ValueError, match=r"^object_scores: .* has no scores for \d+ scanrefer annotations"):
        run_driver(env, "", "--method", "fast3d", "--method-args", "layer=1", "keep=9",
                   "--object-scores", f"{FAST[0]}={as_dict[FAST[0]]}", tasks=(FAST[0],), out=tmp_path / "bad", limit=1)


def test_fast3d_table_score_ratio_against_our_vanilla(env):
    """Score Ratio of a run against our vanilla run, on summaries of a real five-benchmark run whose headline
    metrics are set to the README's Chat-Scene and "FastV 35%" figures: 99.74, as the README prints."""
    import copy

    from shared import paper_figures

    readme = {r["row"]: r for r in paper_figures.load("fast3d_scores")}
    vanilla = copy.deepcopy(run_driver(env, "vanilla", tasks=("all",)).summary)
    fastv = copy.deepcopy(vanilla)
    for _, task, key, col in env.drv.FAST3D_COLUMNS:
        vanilla["benchmarks"][task]["metrics"][key] = float(readme["chatscene_vanilla"][col])
        fastv["benchmarks"][task]["metrics"][key] = float(readme["fastv_35"][col])
    fastv["settings"]["methods"] = [{"name": "fastv", "layer": 16, "keep": 90, "keep_ratio": None}]
    _, rows, _ = env.drv.fast3d_table([vanilla, fastv])
    assert [r[7] for r in rows] == ["100.00", "100.00", "99.74", "99.74"]
    assert rows[3][0] == "  Fast3D README: w/ FastV 35%"
    # a run under another protocol (Fast3D's identity object ids) is not divided by this vanilla
    fastv["settings"]["identity_object_ids"] = not vanilla["settings"]["identity_object_ids"]
    _, rows, _ = env.drv.fast3d_table([vanilla, fastv])
    assert [r[7] for r in rows] == ["100.00", "100.00", "–", "99.74"]


# ---------------------------------------------------------------------------- GAP training targets
def _targets_root(env: Env) -> Path:
    """The synthetic folder again with the training files (their own random stream: val files identical)."""
    if "targets_root" not in env.extra:
        from shared.datasets import write_chat_scene_annotations

        env.extra["targets_root"] = write_chat_scene_annotations(env.workdir / "annotations_train", seed=0,
                                                                 train_per_task=2)
    return env.extra["targets_root"]


def _targets_argv(env: Env, out: Path, split: str, *flags: str) -> List[str]:
    return ["--llm", str(env.ckpt.llm), "--ckpt", str(env.ckpt.ckpt), "--anno-root", str(_targets_root(env).root),
            "--chat-scene-root", str(env.tree.path), "--max-obj-num", str(OBJ), "--attn-implementation", "eager",
            "--llm-dtype", "fp32", "--split", split, "--out", str(out), *flags]


def eager_reference(model, embeds: torch.Tensor, vis_start: int, query_start: int, question_rows: int,
                    assigned: List[int]):
    """Fast3D's get_attn_maps aggregation of the vendored LLM's eager ``output_attentions``: head mean per
    layer, layer mean, rows after p_1, the 3 tokens of each slot summed; a_map over all rows, a_map_ori over
    the question rows; then slot s's value given to object assigned[s]."""
    with torch.no_grad():
        out = model.llama_model(inputs_embeds=embeds, output_attentions=True, use_cache=False, return_dict=True)
    att = torch.stack([a[0].mean(0) for a in out.attentions]).mean(0)  # (L, L)
    per_slot = att[query_start:, vis_start:vis_start + 3 * OBJ].reshape(-1, OBJ, 3).sum(-1)
    maps = []
    for m in (per_slot.mean(0), per_slot[:question_rows].mean(0)):
        obj = torch.full((OBJ,), float("nan"))
        for s, o in enumerate(assigned):
            obj[o] = m[s]
        maps.append(obj)
    return maps


@pytest.mark.parametrize("split,task,index,identity", [
    ("val", "scanrefer", 0, False), ("val", "scanqa", 1, False), ("val", "multi3dref", 2, True),
    ("train", "multi3dref", 1, False), ("train", "scan2cap", 3, False)])
def test_targets_equal_eager_output_attentions_on_the_teacher_forced_input(env, split, task, index, identity):
    """The extracted a_map / a_map_ori equal Fast3D's aggregation of eager output_attentions of the vendored
    LLM; the input is [p_0 | slots built by hand | p_1 | " {prompt} ASSISTANT: {caption}" in slot ids]."""
    drv, model = env.drv, env.model
    args = drv.parse_targets_args(_targets_argv(env, env.workdir / "unused", split))
    _, make_dataset = drv.load_target_data(args, require_patch=env.cb.is_patched(env.tree))
    ds = make_dataset(task)
    anno = json.loads(Path(ds.ann_list[3]).read_text())[index]
    sample = drv.target_sample(ds, split, task, index, 42, identity)
    again = drv.target_sample(ds, split, task, index, 42, identity)
    assert torch.equal(sample["assigned_ids"], again["assigned_ids"]) and sample["caption"] == again["caption"]
    assigned = sample["assigned_ids"].tolist()
    assert sorted(assigned) == list(range(OBJ)) and (assigned == list(range(OBJ))) == identity
    # the answer: the annotation's caption (train); Fast3D's rule on the references (val)
    if split == "train":
        assert sample["caption"] == anno["caption"] and sample["prompt"] == anno["prompt"]
    elif task == "multi3dref":
        assert sample["caption"] == ""
    elif task == "scanqa":
        assert sample["caption"] in [r.capitalize() + "." for r in anno["ref_captions"]]
    else:
        assert sample["caption"] in anno["ref_captions"]
    with torch.no_grad():
        embeds, lay = drv.teacher_forced_input(model, sample)
    # the input, by hand
    slot_of = {o: s for s, o in enumerate(assigned)}
    to_slots = lambda t: re.sub(r"<OBJ(\d{3})>", lambda m: f"<OBJ{slot_of[int(m.group(1))]:03}>", t)  # noqa: E731
    tok = model.llama_tokenizer
    ids = tok(to_slots(f" {anno['prompt']} ASSISTANT: {sample['caption']}"), add_special_tokens=False).input_ids
    q_rows = len(tok(to_slots(f" {anno['prompt']} "), add_special_tokens=False).input_ids)
    p0, p1 = model.p_0_embed, model.p_1_embed
    v0, v1 = p0.shape[0], p0.shape[0] + 3 * OBJ
    emb = embeds[0]
    assert emb.shape[0] == v1 + p1.shape[0] + len(ids)
    assert (lay["visual_start"], lay["slots"], lay["group"], lay["query_start"], lay["question_rows"]) == (
        v0, OBJ, 3, v1 + p1.shape[0], q_rows)
    batch = {"assigned_ids": sample["assigned_ids"][None], "scene_feat": sample["scene_feat"][None],
             "scene_img_feat": sample["scene_img_feat"][None]}
    with torch.no_grad():
        assert torch.equal(emb[:v0], p0) and torch.equal(emb[v1:v1 + p1.shape[0]], p1)
        assert torch.allclose(emb[v0:v1], visual_span_by_hand(env, model, batch), atol=1e-6, rtol=0)
        text = model.llama_model.base_model.model.model.embed_tokens(torch.tensor(ids))
        assert torch.equal(emb[v1 + p1.shape[0]:], text)
    a_map, a_map_ori = drv.object_targets(model, sample, chunk=5)  # several row chunks per layer
    ref, ref_ori = eager_reference(model, embeds, v0, v1 + p1.shape[0], q_rows, assigned)
    assert torch.allclose(a_map, ref, atol=1e-5, rtol=0) and torch.allclose(a_map_ori, ref_ori, atol=1e-5, rtol=0)
    assert emb.shape[0] - lay["query_start"] > q_rows and not torch.equal(a_map, a_map_ori)  # answer rows count
    assert 0 < float(a_map.sum()) <= 1 + 1e-5


def test_targets_command_writes_gap_training_files_resumably(env, monkeypatch):
    """`targets` on the train split: every annotation gets a record in annotation order that GAP training's
    reader (shared.datasets.fast3d_gap.load_split) matches by key; a limited run is continued, a finished
    one does no work (no model, no target computed), other settings are refused, and two ranks merged give
    the single-process file."""
    from shared.datasets.chat_scene_synthetic import TRAIN_ANNOTATIONS
    from shared.datasets.fast3d_gap import SceneFeatures, load_split
    from shared.methods.fast3d_targets import annotation_keys

    drv, data = env.drv, _targets_root(env)
    patched = env.cb.is_patched(env.tree)
    out = env.workdir / "targets"
    calls = []
    real = drv.object_targets

    def counted(model, sample, chunk=64):
        calls.append(sample["prompt"])
        return real(model, sample, chunk)

    monkeypatch.setattr(drv, "object_targets", counted)
    monkeypatch.setattr(drv, "load_model", lambda *a, **k: env.model)
    tasks = ["--tasks", "scanrefer", "multi3dref", "scanqa"]
    drv.main_targets(_targets_argv(env, out, "train", *tasks, "--limit", "2"), env={}, require_patch=patched)
    assert len(calls) == 6
    drv.main_targets(_targets_argv(env, out, "train", *tasks), env={}, require_patch=patched)
    assert len(calls) == 6 + sum(data.train_counts[t] - 2 for t in ("scanrefer", "multi3dref", "scanqa"))

    feats = SceneFeatures(str(data.root / "scannet_mask3d_uni3d_feats.pt"), str(data.root / "scannet_mask3d_videofeats.pt"), OBJ)
    sets = load_split(str(data.root), "scanrefer#multi3dref#scanqa", "train", feats, targets_root=str(out))
    files = {}
    for task, ds in sets.items():
        recs = torch.load(out / f"infer_attn_maps_train_{task}.pt", weights_only=True)
        annos = json.loads((data.root / TRAIN_ANNOTATIONS[task]).read_text())
        assert [r["index"] for r in recs] == list(range(data.train_counts[task]))
        assert [r["key"] for r in recs] == annotation_keys(task, annos)
        assert all(torch.equal(ds.targets[r["index"]], r["a_map"]) for r in recs)
        assert all(r["a_map"].shape == (OBJ,) and 0 < float(r["a_map"].sum()) <= 1 + 1e-5 for r in recs)
        files[task] = recs
    # the first two of each file were written by the limited run and kept
    _, make_dataset = drv.load_target_data(drv.parse_targets_args(_targets_argv(env, out, "train")), patched)
    a_map, _ = real(env.model, drv.target_sample(make_dataset("scanqa"), "train", "scanqa", 1, 42))
    assert torch.allclose(files["scanqa"][1]["a_map"], a_map, atol=1e-6, rtol=0)

    # finished: nothing computed, no model loaded, the files unchanged
    monkeypatch.setattr(drv, "load_model", lambda *a, **k: pytest.fail("the model was loaded for a finished run"))
    n = len(calls)
    drv.main_targets(_targets_argv(env, out, "train", *tasks), env={}, require_patch=patched)
    assert len(calls) == n
    for task, recs in files.items():
        again = torch.load(out / f"infer_attn_maps_train_{task}.pt", weights_only=True)
        assert [r["key"] for r in again] == [r["key"] for r in recs]
        assert all(torch.equal(a["a_map"], b["a_map"]) and torch.equal(a["a_map_ori"], b["a_map_ori"])
                   for a, b in zip(again, recs))
    with pytest.raises(ValueError, match=r"^out: .* other settings .*'seed': \(42, 7\)"):
        drv.main_targets(_targets_argv(env, out, "train", *tasks, "--seed", "7"), env={}, require_patch=patched)

    # two ranks, merged: the single-process file
    monkeypatch.setattr(drv, "load_model", lambda *a, **k: env.model)
    sharded = env.workdir / "targets-2"
    for rank in (0, 1):
        drv.main_targets(_targets_argv(env, sharded, "train", "--tasks", "scanqa"), require_patch=patched,
                         env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert len(list(sharded.glob("infer_attn_maps_train_scanqa.rank*-of-00002.pt"))) == 2
    drv.main_targets(_targets_argv(env, sharded, "train", "--tasks", "scanqa", "--merge-only"), env={},
                     require_patch=patched)
    merged = torch.load(sharded / "infer_attn_maps_train_scanqa.pt", weights_only=True)
    assert [r["key"] for r in merged] == [r["key"] for r in files["scanqa"]]
    assert all(torch.equal(a["a_map"], b["a_map"]) for a, b in zip(merged, files["scanqa"]))
    assert not list(sharded.glob("*.rank*"))
