"""Tiny random stand-ins for Fast3D's GAP network, for the demo and the tests (nothing downloaded).

    path = write_roberta(tmpdir)                         # random RobertaModel + byte-level BPE tokenizer folder
    scorer = tiny_gap_scorer(path, n_obj=100)            # GapScorer: (prompt, feats, img feats, boxes) -> (100,) logits

The tokenizer folder (``vocab.json`` + ``merges.txt``) is hand-written: GPT-2's 256 byte symbols, the five
RoBERTa specials and three merges, so ``RobertaTokenizer.from_pretrained(path, local_files_only=True)``
loads it. Weights are random (seeded); the logits mean nothing beyond their shapes and cost.
"""
from __future__ import annotations

import json
import os
from typing import List

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def byte_alphabet() -> List[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_roberta(path: str, hidden: int = 32, layers: int = 1, heads: int = 2, seed: int = 0) -> str:
    """Write a random ``RobertaModel`` (hidden size ``hidden``) + tokenizer folder at ``path`` (created),
    loadable with ``local_files_only=True``. Returns ``path``."""
    from transformers import RobertaConfig, RobertaModel

    os.makedirs(path, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for c in byte_alphabet():
        vocab.setdefault(c, len(vocab))
    merges = ["Ġ t", "h e", "Ġt he"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=256, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    RobertaModel(cfg).save_pretrained(path)
    return path


def tiny_gap_scorer(roberta_path: str, n_obj: int = 100, feat_dim: int = 1024, img_feat_dim: int = 1024,
                    hidden: int = 32, heads: int = 2, layers: int = 2, seed: int = 0):
    """A random GAP network (eval mode) over the RoBERTa folder ``roberta_path`` (``write_roberta``), wrapped
    as the online scorer ``GapScorer``: n_obj object slots of feat_dim (3D) + img_feat_dim (2D) features,
    a spatial transformer of ``layers`` layers at width ``hidden``."""
    from ..methods.fast3d_cmt import CMTConfig
    from ..methods.fast3d_gap import GAPConfig, GAPNet, GapScorer, load_text_encoder

    encoder, tokenizer = load_text_encoder(roberta_path)
    cfg = GAPConfig(feat_dim=feat_dim, img_feat_dim=img_feat_dim, text_hidden_size=encoder.config.hidden_size,
                    max_obj_num=n_obj, cmt=CMTConfig(hidden_size=hidden, num_heads=heads, num_layers=layers,
                                                    ffn_dim=2 * hidden))
    torch.manual_seed(seed)
    return GapScorer(GAPNet(cfg, encoder).eval(), tokenizer)


__all__ = ["SPECIALS", "byte_alphabet", "tiny_gap_scorer", "write_roberta"]
