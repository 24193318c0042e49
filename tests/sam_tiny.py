"""Tiny random SAM models from ``segment_anything``'s own classes (no weights), for the SAM mask-source tests.

``tiny_sam`` mirrors ``segment_anything.build_sam._build_sam`` at test sizes: the 1024-px input, a ViT of
``width`` × ``depth`` with 64-px patches (a 16 × 16 image embedding), prompt encoder and mask decoder
``dim``-d. The defaults equal the SAM that ``tests/hosts/lisa_build.build_sam_tiny`` assembles from LISA's
vendored classes, so a state dict of one loads into the other. ``tiny_type`` registers such an
architecture the way ``shared.segfirst_sam.SAM_TYPES`` lists the released ones.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

PATCH, SIZE = 64, 1024


def tiny_sam(width: int = 16, depth: int = 2, dim: int = 32, with_encoder: bool = True, seed: Optional[int] = None):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from shared.segfirst_sam import NoImageEncoder

    if seed is not None:
        torch.manual_seed(seed)
    enc = ImageEncoderViT(
        depth=depth, embed_dim=width, img_size=SIZE, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2, patch_size=PATCH, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[depth - 1],
        window_size=4, out_chans=dim,
    ) if with_encoder else NoImageEncoder(SIZE)
    return Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(SIZE // PATCH, SIZE // PATCH),
                                     input_image_size=(SIZE, SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def tiny_type(name: str = "vit_tiny", width: int = 16, depth: int = 2, dim: int = 32):
    """A ``SamType`` for ``tiny_sam`` of these sizes (register with ``monkeypatch.setitem(SAM_TYPES, ...)``)."""
    from shared.segfirst_sam import SamType

    return SamType(name, width, depth, lambda with_encoder: tiny_sam(width, depth, dim, with_encoder))
