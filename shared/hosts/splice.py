"""Visual-token masks of a LLaVA-style spliced sequence (shared by the LLaVA-NeXT and LLaVA-3D forks).

LLaVA's ``prepare_inputs_labels_for_multimodal`` splits each prompt at its placeholder ids and splices
features in their place: the per-sample segment list alternates text and placeholder features,
``[text_0, special_0, text_1, special_1, ..., text_n]``. A placeholder is an image (LLaVA's
``IMAGE_TOKEN_INDEX`` = -200: visual tokens) or, in LLaVA-3D, a click (``LOC_TOKEN_INDEX`` = -300: one
prompt token, never visual). After splicing, sequences are truncated to ``tokenizer_model_max_length``
(the first tokens stay) and padded left or right.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

#: llava.constants.IMAGE_TOKEN_INDEX
IMAGE_TOKEN_INDEX = -200


def segment_mask(segments: Sequence[torch.Tensor], specials: Optional[Sequence[object]] = None,
                 image_token_index: int = IMAGE_TOKEN_INDEX) -> torch.Tensor:
    """Visual-token mask of one sample's spliced sequence.

    segments: the splice loop's segment list, alternating text and placeholder features (each (n_i, d)).
    specials: the placeholder id of each odd segment, in order (ints or 0-d tensors); only those equal
    to ``image_token_index`` are visual. None: every odd segment is an image (LLaVA-NeXT).
    Returns (sum of n_i,) bool, True on visual tokens.
    """
    flags = []
    for i in range(len(segments)):
        if i % 2 == 0:
            flags.append(False)
        elif specials is None:
            flags.append(True)
        else:
            j = i // 2
            if j >= len(specials):
                raise ValueError(f"specials: segment {i} is placeholder {j}, but only {len(specials)} placeholder ids were given")
            flags.append(int(specials[j]) == image_token_index)
    parts = [torch.full((int(s.shape[0]),), f, dtype=torch.bool) for s, f in zip(segments, flags)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def padded_visual_mask(masks: Sequence[torch.Tensor], attention_mask: torch.Tensor, hint: str = "") -> torch.Tensor:
    """Place per-sample visual masks (untruncated, (n_b,) bool) on the padded batch.

    attention_mask: (B, L) of the padded spliced batch, True on each sample's kept tokens (a contiguous
    run, left- or right-aligned). Truncation keeps the first tokens of a sample, so its valid run holds
    the first ``attention_mask[b].sum()`` entries of ``masks[b]``. hint: appended to the error for a
    wrong number of masks. Returns (B, L) bool.
    """
    valid = attention_mask.bool()
    if len(masks) != valid.shape[0]:
        raise ValueError(f"masks: expected {valid.shape[0]} per-sample masks, got {len(masks)}{hint}")
    out = torch.zeros_like(valid)
    for b, m in enumerate(masks):
        n = int(valid[b].sum())
        if n > m.shape[0]:
            raise ValueError(f"attention_mask: sample {b} has {n} valid tokens but its spliced sequence only {m.shape[0]}")
        out[b, valid[b]] = m[:n].to(out.device)
    return out


__all__ = ["IMAGE_TOKEN_INDEX", "padded_visual_mask", "segment_mask"]
