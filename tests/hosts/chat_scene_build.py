"""A tiny random Chat-Scene built from Chat-Scene's own classes, saved the way its training saves one.

Everything is the real Chat-Scene of the patched tree (``tests/hosts/upstream.py``; the stock tree while
``patches/Chat-Scene`` is empty) except sizes and two CPU substitutions:

- the "Vicuna" folder: the vendored ``models/configuration_llama.py`` LlamaConfig at 4 layers × 64 hidden,
  4 heads, FFN 128 and a vendored ``LlamaForCausalLM`` with random weights (seeded), saved fp32 with
  ``save_pretrained``; its tokenizer is a LLaMA-style sentencepiece model trained here on Chat-Scene's system
  prompt and instruction (read from the tree) and the synthetic annotations (byte fallback: any text
  encodes). Its ``p_0`` prefix is therefore not the 45 tokens the real LLaMA tokenizer gives: the visual
  span starts at ``len(p_0_embed)``, whatever the tokenizer;
- ``Chat3D.__init__``'s ``LlamaForCausalLM.from_pretrained(..., torch_dtype=torch.bfloat16,
  attn_implementation="flash_attention_2")`` loads fp32 with "eager" (or "sdpa"): no flash-attn and no bf16
  matmuls on CPU (``eval_chatscene.llm_loading``, scoped);
- everything else as ``scripts/config.py`` + ``scripts/run.sh`` set it (``eval_chatscene.chat_scene_config``):
  ``add_img_token=True``, ``add_scene_token=False``, ``add_pos_emb=False``, ``bidirection=False``,
  ``use_lora=True`` with r = alpha = 16 on q/k/v/o/gate/up/down, object features 1024-d (3D and 2D), the
  object projectors 1024 → 64 → 64, ``max_obj_num`` object slots (100 in the released model; tests may use
  fewer) and ``<OBJ000>``… tokens added by Chat3D itself.

``build_checkpoint`` then gives the trainable parameters (LoRA A and B, ``embed_tokens``, ``lm_head``,
the projectors) seeded random values (LoRA B is zero-initialised, which would make LoRA a no-op) and saves
them as ``tasks/train.py`` saves a checkpoint: ``{"model": state dict without the frozen parameters,
"config": the Chat-Scene config, "epoch", "global_step"}`` in ``ckpt_01_3446.pth``. The synthetic scene data
come from ``shared.datasets.chat_scene_synthetic`` (the real annotation file formats).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from . import upstream
from .lisa_build import train_tokenizer

DRIVER = upstream.ROOT / "eval" / "Chat-Scene" / "eval_chatscene.py"
LAYERS, HIDDEN, HEADS, INTER = 4, 64, 4, 128
FEAT_DIM = 1024  # Uni3D / DINOv2 object features (config input_dim / img_input_dim)


def load_driver():
    """``eval/Chat-Scene/eval_chatscene.py`` as a module (it is a script, not a package)."""
    name = "chat_scene_eval_real"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DRIVER)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def is_patched(tree: upstream.PatchedTree) -> bool:
    """Whether the tree's ``models/modeling_llama.py`` carries the series (it imports ``shared``)."""
    return "shared" in (tree.path / "models" / "modeling_llama.py").read_text(encoding="utf-8")


def tokenizer_lines(tree: upstream.PatchedTree, anno_root: Path) -> List[str]:
    """Chat-Scene's system prompt and instruction, the roles, and every prompt and reference text of the
    synthetic annotations (repeated so that sentencepiece sees them often enough)."""
    import json

    lines = [(tree.path / "prompts" / n).read_text(encoding="utf-8") for n in ("system.txt", "instruction.txt")]
    lines += ["USER: ASSISTANT: </s>", "Yes. No. There is a chair, a table and a sofa."]
    for p in sorted(anno_root.glob("*.json")):
        data = json.loads(p.read_text(encoding="utf-8"))
        items = data if isinstance(data, list) else [{"ref_captions": v} for v in data.values()]
        for a in items:
            lines += [a.get("prompt", "")] + [str(c) for c in a.get("ref_captions", [])]
    return [ln for ln in lines if ln] * 4


def build_vicuna(tree: upstream.PatchedTree, workdir: Path, lines: Sequence[str], seed: int = 0) -> Path:
    """The tiny "vicuna-7b-v1.5" folder: vendored LlamaConfig + LlamaForCausalLM (fp32), slow LLaMA tokenizer."""
    from transformers import LlamaTokenizer

    upstream.use_tree(tree.path, upstream.PACKAGES["Chat-Scene"])
    from models.configuration_llama import LlamaConfig
    from models.modeling_llama import LlamaForCausalLM

    out = workdir / "tiny-vicuna"
    out.mkdir(parents=True)
    sp = workdir / "tokenizer.model"
    train_tokenizer(sp, lines)
    tok = LlamaTokenizer(vocab_file=str(sp), legacy=False)
    tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, max_position_embeddings=640, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


def driver_args(drv, llm: Path, anno_root: Path, out: Path, *flags: str, ckpt: Optional[Path] = None,
                tree: Optional[upstream.PatchedTree] = None, max_obj_num: int = 12,
                max_new_tokens: int = 8, attn: str = "eager") -> argparse.Namespace:
    """The driver's argparse namespace for a CPU fp32 run on the synthetic data."""
    argv = ["--llm", str(llm), "--anno-root", str(anno_root), "--out", str(out), "--max-obj-num", str(max_obj_num),
            "--max-new-tokens", str(max_new_tokens), "--attn-implementation", attn, "--llm-dtype", "fp32",
            "--no-progress"]
    if ckpt is not None:
        argv += ["--ckpt", str(ckpt)]
    if tree is not None:
        argv += ["--chat-scene-root", str(tree.path)]
    return drv.parse_args(argv + list(flags))


@dataclass
class Checkpoint:
    """A saved tiny Chat-Scene: the Vicuna folder, the checkpoint file, the model that was saved (for
    comparisons), the annotation folder it was built for and its ``max_obj_num``."""

    llm: Path
    ckpt: Path
    model: Any
    tree: upstream.PatchedTree
    anno_root: Path
    max_obj_num: int


def build_checkpoint(tree: upstream.PatchedTree, workdir: Path, anno_root: Path, max_obj_num: int = 12,
                     seed: int = 0, llm: Optional[Path] = None) -> Checkpoint:
    """Build Chat3D through its ``__init__`` on a tiny Vicuna (built here unless ``llm`` is given), give its
    trainable parameters seeded values and save them as Chat-Scene's training does."""
    drv = load_driver()
    workdir.mkdir(parents=True, exist_ok=True)
    if llm is None:
        llm = build_vicuna(tree, workdir, tokenizer_lines(tree, anno_root), seed)
    args = driver_args(drv, llm, anno_root, workdir / "unused", tree=tree, max_obj_num=max_obj_num)
    upstream.use_tree(tree.path, upstream.PACKAGES["Chat-Scene"])
    cfg = drv.chat_scene_config(args, tree.path)
    model = drv.build_chat3d(cfg, "eager", "fp32")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_" in name or "proj" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "lora_B" in name else 0.05))
            elif p.requires_grad:  # embed_tokens / lm_head: perturb so the file differs from the Vicuna
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in frozen}
    assert trainable <= set(state)
    path = workdir / f"ckpt_01_3446-obj{max_obj_num}.pth"
    torch.save({"model": state, "config": cfg, "epoch": 1, "global_step": 3446}, path)
    return Checkpoint(llm, path, model.eval(), tree, anno_root, max_obj_num)
