"""A tiny random LISA built from LISA's own classes, saved as a checkpoint the eval driver loads.

Everything here is the real, patched LISA (``tests/hosts/upstream.py`` materialises it) except
sizes: a LLaMA of 6 layers × 64, a CLIP ViT of 3 layers × 32 at 224 px / 14 px (N = 256 image
tokens, as ``openai/clip-vit-large-patch14``: LISA's hard-coded 255 stays right for the stock code),
a SAM assembled like LISA's ``_build_sam`` from LISA's own SAM classes at test sizes (``build_sam_tiny``:
1024-px input, 16-d ViT with 64-px patches, 32-d prompt encoder and mask decoder; the test
substitutes ``build_sam_vit_h``, the only builder ``model/LISA.py`` calls, and ViT-H never runs),
and a sentencepiece LLaMA tokenizer trained here on the prompts (byte fallback: any text encodes).

The checkpoint directory has what ``eval/LISA/eval_seg.py`` ``load_data``/``load_model`` read from a
released LISA: ``config.json`` (LlavaConfig with LISA's fields), weights, the slow tokenizer
(with ``[SEG]``, ``<im_start>``, ``<im_end>`` already added), and a CLIP tower directory (weights +
``preprocessor_config.json``) named in ``config.vision_tower``.

Also here, separate from the assertions: the stock (unpatched) ``model/LISA.py`` loaded from the
tree's base commit, and the references the tests compare against.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from . import upstream

FIXTURES = upstream.ROOT / "tests" / "fixtures" / "lisa"
DRIVER = upstream.ROOT / "eval" / "LISA" / "eval_seg.py"

LAYERS, HIDDEN, HEADS, INTER = 6, 64, 4, 128
CLIP_HIDDEN, CLIP_LAYERS, CLIP_HEADS, CLIP_IMG, CLIP_PATCH = 32, 3, 4, 224, 14
N = (CLIP_IMG // CLIP_PATCH) ** 2  # 256
SAM_DIM = 32  # SAM's prompt/mask-decoder width (256 in LISA) = config.out_dim
VAL_DATASETS = ("refcoco|unc|val", "ReasonSeg|val")


# ------------------------------------------------------------------------------------ imports
def import_lisa(tree: upstream.PatchedTree) -> Dict[str, Any]:
    """Import the patched tree's modules (``model``, ``utils`` top-level packages)."""
    upstream.use_tree(tree.path, upstream.PACKAGES["LISA"])
    lisa_mod = importlib.import_module("model.LISA")
    build_sam_mod = importlib.import_module("model.segment_anything.build_sam")

    return {"LISA": lisa_mod, "build_sam": build_sam_mod}


def load_driver():
    """``eval/LISA/eval_seg.py`` as a module (it is a script, not a package)."""
    name = "lisa_eval_seg_real"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DRIVER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stock_module(tree: upstream.PatchedTree, sam_builder) -> types.ModuleType:
    """The unpatched ``model/LISA.py`` (the tree's base commit) as module ``model.LISA_stock``: its
    relative imports resolve to the same ``model`` package (the series changes only LISA.py)."""
    name = "model.LISA_stock"
    if name in sys.modules:
        return sys.modules[name]
    src = tree.stock_file("model/LISA.py")
    if "shared_lisa" in src:
        raise RuntimeError("tree.base: model/LISA.py at the base commit is already patched")
    mod = types.ModuleType(name)
    mod.__package__ = "model"
    mod.__file__ = str(tree.path / "model" / "LISA.py") + f" @ {tree.base[:12]}"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    mod.build_sam_vit_h = sam_builder
    return mod


@contextmanager
def cpu_cuda_calls() -> Iterator[None]:
    """LISA's ``model_forward`` moves helper tensors with ``.cuda()``; on this CPU-only run that
    call returns the tensor where it is (test harness only, restored on exit)."""
    old = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = old


# -------------------------------------------------------------------------------- the checkpoint
def train_tokenizer(path: Path, lines: Sequence[str]) -> None:
    """A LLaMA-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback) trained on ``lines``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_writer=buf, vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def _prompt_lines(conversation_lib) -> List[str]:
    import json
    import pickle

    conv = conversation_lib.conv_templates["llava_v1"]
    lines = [conv.system, "USER: ASSISTANT: [SEG].", "What is in this image? Please output segmentation mask."]
    for ref in pickle.load(open(FIXTURES / "refer_seg" / "refcoco" / "refs(unc).p", "rb")):
        lines += [s["sent"] for s in ref["sentences"]]
    for p in sorted((FIXTURES / "reason_seg" / "ReasonSeg").glob("*/*.json")):
        lines += json.loads(p.read_text())["text"]
    return lines * 4


def build_sam_tiny(build_sam_mod, checkpoint=None):
    """LISA's ``_build_sam`` (``model/segment_anything/build_sam.py``) at test sizes: the same classes
    and the 1024-px input (``ValDataset`` pads to it), a 2-layer 16-d ViT with 64-px patches (16 x 16
    image embedding, one windowed and one global layer), prompt encoder and mask decoder 32-d."""
    m = build_sam_mod
    image_size, patch = 1024, 64
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=2, embed_dim=16, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=patch, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=[1], window_size=4, out_chans=SAM_DIM,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=SAM_DIM, image_embedding_size=(image_size // patch, image_size // patch),
            input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=SAM_DIM, mlp_dim=2 * SAM_DIM, num_heads=2),
            transformer_dim=SAM_DIM, iou_head_depth=3, iou_head_hidden_dim=SAM_DIM,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            sam.load_state_dict(torch.load(f), strict=False)
    return sam


@dataclass
class Checkpoint:
    """A saved tiny LISA: ``version`` (the checkpoint dir), ``clip`` (the tower dir), the tree."""

    version: Path
    clip: Path
    tree: upstream.PatchedTree
    modules: Dict[str, Any]

    def sam_builder(self):
        """``build_sam_vit_h`` replacement: LISA's ``_build_sam`` with small sizes, from its own parts."""
        return partial(build_sam_tiny, self.modules["build_sam"])


def build_checkpoint(tree: upstream.PatchedTree, workdir: Path, seed: int = 0) -> Checkpoint:
    """Build a random tiny LISA with LISA's classes and save it as a released-style checkpoint."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer

    mods = import_lisa(tree)
    from model.llava import conversation as conversation_lib
    from model.llava.model.language_model.llava_llama import LlavaConfig
    from utils.utils import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN

    clip_dir = workdir / "tiny-clip-vit-patch14"  # LISA's tower builder wants "clip" in the name
    version = workdir / "tiny-lisa"
    clip_dir.mkdir(parents=True)
    version.mkdir(parents=True)
    torch.manual_seed(seed)
    ccfg = CLIPVisionConfig(hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN, num_hidden_layers=CLIP_LAYERS,
                            num_attention_heads=CLIP_HEADS, image_size=CLIP_IMG, patch_size=CLIP_PATCH,
                            projection_dim=CLIP_HIDDEN)
    CLIPVisionModel(ccfg).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMG}, crop_size={"height": CLIP_IMG, "width": CLIP_IMG}).save_pretrained(clip_dir)

    sp = workdir / "tokenizer.model"
    train_tokenizer(sp, _prompt_lines(conversation_lib))
    tok = LlamaTokenizer(vocab_file=str(sp), legacy=True)
    tok.add_tokens("[SEG]")
    tok.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    tok.save_pretrained(version)
    seg_token_idx = tok("[SEG]", add_special_tokens=False).input_ids[0]

    cfg = LlavaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=1024, rms_norm_eps=1e-6,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # the fields of a released LISA config.json (xinlai/LISA-7B-v1), pointing at the tiny tower
    for k, v in dict(vision_tower=str(clip_dir), mm_vision_tower=str(clip_dir), mm_hidden_size=CLIP_HIDDEN,
                     mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=True,
                     mm_use_im_patch_token=False, use_mm_proj=True, train_mask_decoder=True, out_dim=SAM_DIM,
                     image_aspect_ratio="square", tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=True).items():
        setattr(cfg, k, v)
    lisa = mods["LISA"]
    builder = Checkpoint(version, clip_dir, tree, mods).sam_builder()
    old = lisa.build_sam_vit_h
    lisa.build_sam_vit_h = builder
    try:
        model = lisa.LISAForCausalLM(cfg, seg_token_idx=seg_token_idx, vision_tower=str(clip_dir))
    finally:
        lisa.build_sam_vit_h = old
    with torch.no_grad():  # LLaMA's init (std 0.02) on 64-d states gives near-constant SAM prompts
        for p in model.get_model().text_hidden_fcs.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(version, safe_serialization=False)
    return Checkpoint(version, clip_dir, tree, mods)


# ----------------------------------------------------------------------------------- the driver
def driver_args(drv, ckpt: Checkpoint, out: Path, *flags: str, val: Sequence[str] = VAL_DATASETS):
    """The driver's argparse namespace for a CPU fp32 run on the fixtures."""
    argv = ["--version", str(ckpt.version), "--dataset-dir", str(FIXTURES), "--lisa-root", str(ckpt.tree.path),
            "--precision", "fp32", "--out", str(out), "--no-progress", "--val-dataset", *val, *flags]
    return drv.parse_args(argv)


@dataclass
class Loaded:
    """What the driver loads from the checkpoint: tokenizer, [SEG] id, config, ValDataset factory,
    collate_fn (partial), decoder dims, the patched model and the image dtype."""

    tokenizer: Any
    seg_token_idx: int
    config: Any
    make_dataset: Any
    collate: Any
    dims: Any
    model: Any
    dtype: torch.dtype


@contextmanager
def sam_substituted(ckpt: Checkpoint, *modules: types.ModuleType) -> Iterator[None]:
    """``build_sam_vit_h`` of ``modules`` (LISA.py, patched and stock) is the tiny builder inside."""
    builder = ckpt.sam_builder()
    with ExitStack() as stack:
        for m in modules:
            old = m.build_sam_vit_h
            m.build_sam_vit_h = builder
            stack.callback(setattr, m, "build_sam_vit_h", old)
        yield


def load_with_driver(drv, ckpt: Checkpoint, args) -> Loaded:
    """``load_data`` + ``load_model`` of the driver, exactly as its ``main`` calls them (CPU)."""
    tokenizer, seg, config, make_dataset, collate, dims = drv.load_data(args)
    with sam_substituted(ckpt, ckpt.modules["LISA"]):
        model, dtype = drv.load_model(args, config, tokenizer, seg, torch.device("cpu"))
    return Loaded(tokenizer, seg, config, make_dataset, collate, dims, model, dtype)


class ForwardLog:
    """Records every ``model(**batch)`` call the driver makes inside its ``shared.prune`` session: the
    batch, the outputs and the session's record of that forward (``ForwardRecord``), plus the
    clustering selection read off the record (per row, indices into the image tokens)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: List[Dict[str, Any]] = []
        self._h = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, _args, kwargs, output):
        from shared.hosts import session_of

        session = session_of(module)
        record = session.last if session is not None else None
        selection = None
        if record is not None and record.stats.stages:
            starts, _, _ = positions(kwargs, module.seg_token_idx, int(record.host["image_tokens"]))
            first = record.stats.stages[0][1]
            n = int(record.host["image_tokens"])
            if all(len(f) < n for f in first):  # a clustering stage ran before layer 0
                selection = [f - s for f, s in zip(first, starts)]
        self.calls.append({"batch": dict(kwargs), "output": output, "record": record, "selection": selection})

    def close(self) -> None:
        self._h.remove()


def stock_model(ckpt: Checkpoint, loaded: Loaded) -> torch.nn.Module:
    """The unpatched LISAForCausalLM with the patched model's weights (same config, same tower)."""
    stock = stock_module(ckpt.tree, ckpt.sam_builder())
    with sam_substituted(ckpt, stock):
        m = stock.LISAForCausalLM(loaded.config, seg_token_idx=loaded.seg_token_idx, vision_tower=loaded.config.vision_tower)
    m.get_model().initialize_vision_modules(m.get_model().config)
    m.load_state_dict(loaded.model.state_dict(), strict=True)
    return m.eval()


# ----------------------------------------------------------------------------------- references
def positions(batch: Dict[str, Any], seg_token_idx: int, image_tokens: int):
    """From ``input_ids`` alone: the image placeholder index s per row, the [SEG] index per row in the
    spliced sequence (input index + n − 1), and the valid (non-pad) length per row."""
    ids = batch["input_ids"]
    s = [int((r == -200).nonzero()) for r in ids]
    seg = [int((r == seg_token_idx).nonzero()[-1]) + image_tokens - 1 for r in ids]
    return s, seg, [int(v) for v in batch["attention_masks"].sum(1)]


def lisa_tail(model, hidden: torch.Tensor, rows_pos: Sequence[int], batch: Dict[str, Any]) -> torch.Tensor:
    """LISA's ``model_forward`` after the LLM, transcribed (one image): ``text_hidden_fcs`` on the
    hidden state at ``rows_pos`` (one per row), SAM prompt encoder + mask decoder (single mask),
    ``postprocess_masks`` to the label size. Returns (rows, H, W) mask logits."""
    inner = model.get_model()
    sam = inner.visual_model
    last = inner.text_hidden_fcs[0](hidden)
    emb = torch.stack([last[r, p] for r, p in enumerate(rows_pos)])
    image_emb = sam.image_encoder(batch["images"][0:1])
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None, text_embeds=emb.unsqueeze(1))
    low, _ = sam.mask_decoder(image_embeddings=image_emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse.to(emb.dtype), dense_prompt_embeddings=dense,
                              multimask_output=False)
    out = sam.postprocess_masks(low, input_size=batch["resize_list"][0], original_size=batch["label_list"][0].shape)
    return out[:, 0]


def llava_hidden(model, batch: Dict[str, Any], projector_input: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LISA's ``super().forward`` (LlavaLlamaForCausalLM.forward, the LLaVA code LISA calls) on the
    batch: final-norm hidden states (rows, L_spliced, d). ``projector_input``: (1, K, C) tokens fed to
    ``mm_projector`` instead of the tower's (a pre-LLM reducer's output, run separately)."""
    from model.llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    rows = batch["input_ids"].shape[0]
    handle = None
    if projector_input is not None:
        feats = projector_input.expand(rows, -1, -1)
        handle = model.get_model().mm_projector.register_forward_pre_hook(lambda _m, _a: (feats,))
    try:
        out = LlavaLlamaForCausalLM.forward(model, images=batch["images_clip"].expand(rows, -1, -1, -1).contiguous(),
                                            attention_mask=batch["attention_masks"], input_ids=batch["input_ids"],
                                            output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()
    return out.hidden_states


def cls_attention_by_hand(model, images_clip: torch.Tensor) -> torch.Tensor:
    """(N,) [CLS] → patch attention of the tower's last layer in float64, as PruMerge and LVLM_CSP's
    CLS sampler score it: one full-width product softmax(q([CLS]) · k(all)ᵀ / sqrt(C)) on
    ``layer_norm1`` of the second-to-last hidden state, [CLS] column dropped."""
    clip = model.get_model().get_vision_tower().vision_tower
    hs = clip(images_clip, output_hidden_states=True).hidden_states
    layer = clip.vision_model.encoder.layers[-1]
    x = layer.layer_norm1(hs[-2])[0].double()
    att = layer.self_attn
    q = torch.nn.functional.linear(x[:1], att.q_proj.weight.double(), att.q_proj.bias.double())
    k = torch.nn.functional.linear(x, att.k_proj.weight.double(), att.k_proj.bias.double())
    return torch.softmax(q @ k.T / k.shape[-1] ** 0.5, dim=-1)[0, 1:]
