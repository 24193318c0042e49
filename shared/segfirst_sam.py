"""SAM automatic masks as a Seg-First mask source (``segment-anything``, Apache-2.0, optional).

``SamMaskSource`` returns class-agnostic instance masks (M, H, W) on the original image, the same
contract as ``shared.segfirst.YoloMaskSource``, from ``segment_anything``'s own
``SamAutomaticMaskGenerator`` (a ``points_per_side``² point grid, three masks per point, filtered by
predicted IoU and stability, box NMS, optional small-region clean-up; one crop: the whole image).

Two modes, same decoder weights (the original SAM prompt encoder + mask decoder of a local checkpoint,
``sam_vit_{b,l,h}_*.pth``; never downloaded):

- standalone (``shared_encoder=False``): the generator runs the checkpoint's own ViT image encoder on
  the image, as ``SamPredictor.set_image`` does (ResizeLongestSide to 1024, normalise, pad).
- shared encoder (``shared_encoder=True``): the image embeddings (1, 256, 64, 64) come from a host that
  computes them anyway (LISA runs the frozen original SAM ViT-H on every image; ``shared.hosts.lisa``
  hooks its ``visual_model.image_encoder`` and calls ``set_embeddings`` before each image). Only the
  prompt encoder and mask decoder are loaded; calling an image encoder is impossible (none is built).
  LISA's own mask decoder is fine-tuned for [SEG] prompts, so it is not the one used.

Given the same embeddings both modes return identical masks (the shared predictor only skips the
encoder call). ``sam_input_size`` / ``padded_input_size`` relate an original image to the encoder
input: the image must be the one the embeddings were computed from (checked by size).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .segfirst import check_image

#: SAM's encoder input side (ResizeLongestSide target, padded square) for the released models.
SAM_IMAGE_SIZE = 1024


# ------------------------------------------------------------------------------------ imports
def _import_sam():
    try:
        import segment_anything
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor
    except ImportError as e:
        raise ImportError(
            "SamMaskSource needs the optional package `segment-anything` (with torchvision): "
            f"pip install segment-anything. ({type(e).__name__}: {e})"
        ) from e
    return segment_anything, SamAutomaticMaskGenerator, SamPredictor


# ------------------------------------------------------------------------------------ geometry
def sam_input_size(height: int, width: int, image_size: int = SAM_IMAGE_SIZE) -> Tuple[int, int]:
    """(h', w') of an ``height`` × ``width`` image after SAM's ResizeLongestSide to ``image_size``
    (``get_preprocess_shape``: scale = size / long side, each side ``int(side·scale + 0.5)``)."""
    for name, v in (("height", height), ("width", width), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    scale = image_size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def padded_input_size(encoder_input: torch.Tensor) -> Tuple[int, int]:
    """(h', w') of the image inside a SAM encoder input (1, 3, S, S): SAM (and LISA's ValDataset)
    normalise with the pixel mean/std, then pad with zeros at the bottom/right. A normalised pixel is
    never exactly 0 (the means 123.675, 116.28, 103.53 are not integers), so the image is the extent
    of the nonzero rows and columns."""
    x = encoder_input
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(
            f"encoder_input: expected one padded SAM input (1, 3, S, S), got "
            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
        )
    nz = x[0].ne(0).any(dim=0)  # (S, S)
    rows, cols = torch.nonzero(nz.any(dim=1)).flatten(), torch.nonzero(nz.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("encoder_input: the SAM input is all zeros (no image inside the padding)")
    return int(rows[-1]) + 1, int(cols[-1]) + 1


# ------------------------------------------------------------------------------ model types
@dataclass(frozen=True)
class SamType:
    """A SAM architecture: image encoder width/depth (how a checkpoint is recognised) and a builder.

    build(with_encoder) returns a random-initialised ``segment_anything.modeling.Sam``; without the
    encoder its ``image_encoder`` is a stub that refuses to run (only the prompt encoder and mask
    decoder hold weights)."""

    name: str
    encoder_dim: int
    encoder_depth: int
    build: Callable[[bool], nn.Module]


class NoImageEncoder(nn.Module):
    """Stands where SAM's image encoder would be in the shared-encoder mode: holds ``img_size`` (read
    by ``SamPredictor`` and ``Sam.postprocess_masks``) and refuses to be called."""

    def __init__(self, img_size: int = SAM_IMAGE_SIZE) -> None:
        super().__init__()
        self.img_size = int(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "SamMaskSource(shared_encoder=True) has no image encoder: the host's SAM image embeddings are "
            "given with set_embeddings() before each image"
        )


def _standard_sam(name: str, with_encoder: bool) -> nn.Module:
    """The released architectures as ``segment_anything.build_sam`` builds them (256-d prompts, 1024 px,
    16-px patches); without the encoder, the same prompt encoder and mask decoder around a stub."""
    sam_pkg, _, _ = _import_sam()
    if with_encoder:
        return sam_pkg.sam_model_registry[name](checkpoint=None).eval()
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, size, patch = 256, SAM_IMAGE_SIZE, 16
    return Sam(
        image_encoder=NoImageEncoder(size),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                     input_image_size=(size, size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
                                 transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


#: Architectures a checkpoint may hold, recognised by (image encoder width, depth).
SAM_TYPES: Dict[str, SamType] = {
    "vit_b": SamType("vit_b", 768, 12, partial(_standard_sam, "vit_b")),
    "vit_l": SamType("vit_l", 1024, 24, partial(_standard_sam, "vit_l")),
    "vit_h": SamType("vit_h", 1280, 32, partial(_standard_sam, "vit_h")),
}

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"


def _signature_of_state(state: Mapping[str, Any]) -> Tuple[int, int]:
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    return int(state[_PATCH_KEY].shape[0]), depth


def encoder_signature(encoder: nn.Module) -> Tuple[int, int]:
    """(width, depth) of a SAM ``ImageEncoderViT`` (LISA's vendored one or ``segment_anything``'s)."""
    proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(proj, nn.Module) or not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"encoder: expected a SAM ImageEncoderViT (patch_embed.proj, blocks), got {type(encoder).__name__}")
    return int(proj.weight.shape[0]), len(blocks)


def _type_name(sig: Tuple[int, int]) -> str:
    for t in SAM_TYPES.values():
        if (t.encoder_dim, t.encoder_depth) == sig:
            return t.name
    return "an unknown type"


def _torch_load(path: str) -> Any:
    """``torch.load`` of tensors only, memory-mapped when the file and torch allow it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except TypeError:  # torch < 2.1 has no mmap
        pass
    except RuntimeError as e:  # a legacy (non-zip) file cannot be memory-mapped
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A SAM checkpoint (plain state dict) from a local file, memory-mapped where torch can (only the
    tensors used are read). Errors name ``checkpoint``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint: expected a path to a local SAM checkpoint, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint: no file at {path!r}; pass the local path of e.g. sam_vit_h_4b8939.pth "
            f"(SamMaskSource never downloads weights)"
        )
    try:
        state = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: not a plain state dict
        raise ValueError(
            f"checkpoint: {path} is not a plain SAM state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint: {path} holds a {type(state).__name__}, expected a SAM state dict of tensors")
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    missing = [p[:-1] for p in parts if not any(k.startswith(p) for k in state)]
    if missing or _PATCH_KEY not in state:
        some = ", ".join(sorted(state)[:3])
        raise ValueError(
            f"checkpoint: {path} is not a SAM checkpoint (no {', '.join(missing) or _PATCH_KEY} weights; keys begin "
            f"{some or 'nowhere: empty'}); expected the original SAM weights, e.g. sam_vit_h_4b8939.pth"
        )
    return dict(state)


def checkpoint_type(state: Mapping[str, torch.Tensor], model_type: Optional[str] = None,
                    path: str = "checkpoint") -> SamType:
    """The ``SAM_TYPES`` entry whose image encoder the state dict holds; ``model_type`` (if given) must agree."""
    if model_type is not None and model_type not in SAM_TYPES:
        raise ValueError(f"model_type: expected one of {', '.join(SAM_TYPES)}, got {model_type!r}")
    sig = _signature_of_state(state)
    found = [t for t in SAM_TYPES.values() if (t.encoder_dim, t.encoder_depth) == sig]
    if not found:
        raise ValueError(
            f"checkpoint: {path} holds a SAM image encoder of width {sig[0]} and {sig[1]} blocks, which is none of "
            + ", ".join(f"{t.name} ({t.encoder_dim}-d, {t.encoder_depth} blocks)" for t in SAM_TYPES.values())
        )
    t = found[0]
    if model_type is not None and t.name != model_type:
        want = SAM_TYPES[model_type]
        raise ValueError(
            f"checkpoint: {path} is a {t.name} SAM ({sig[0]}-d, {sig[1]} blocks), but model_type={model_type!r} "
            f"({want.encoder_dim}-d, {want.encoder_depth} blocks) was asked for"
        )
    return t


# ------------------------------------------------------------------------------------ checks
def _unit(name: str, v: Any, low_open: bool = False) -> float:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0)
    if not ok:
        raise ValueError(f"{name}: expected a float in {'(0, 1]' if low_open else '[0, 1]'}, got {v!r}")
    return float(v)


def _count(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return int(v)


# ------------------------------------------------------------------------------------ the source
@dataclass
class _Pending:
    embeddings: torch.Tensor  # (1, C, h, w) on the decoder's device and dtype
    input_size: Tuple[int, int]


class SamMaskSource:
    """SAM automatic instance masks at the original image size (see the module docstring).

    checkpoint: local SAM checkpoint (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``,
    ``sam_vit_h_4b8939.pth``); its type is read from the image encoder's shapes (``model_type``, if
    given, must agree). Or ``model=``: an already built ``segment_anything`` ``Sam``.
    shared_encoder: decode the host's image embeddings (``set_embeddings`` before each call) instead of
    running an image encoder. Generator parameters (``SamAutomaticMaskGenerator``'s, same defaults):
    points_per_side (grid of points_per_side² prompts), points_per_batch, pred_iou_thresh and
    stability_score_thresh (in [0, 1]; 0 disables the filter), box_nms_thresh (in (0, 1]),
    min_mask_region_area (pixels; > 0 removes smaller islands/holes, needs OpenCV).
    ``last_seconds``: wall time of the last call (decoder, or encoder + decoder); ``last_count``: masks.
    """

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        *,
        model_type: Optional[str] = None,
        model: Optional[nn.Module] = None,
        shared_encoder: bool = False,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        device: Any = "cpu",
    ) -> None:
        if not isinstance(shared_encoder, bool):
            raise TypeError(f"shared_encoder: expected a bool, got {type(shared_encoder).__name__}")
        self.points_per_side = _count("points_per_side", points_per_side, 1)
        self.points_per_batch = _count("points_per_batch", points_per_batch, 1)
        self.pred_iou_thresh = _unit("pred_iou_thresh", pred_iou_thresh)
        self.stability_score_thresh = _unit("stability_score_thresh", stability_score_thresh)
        self.box_nms_thresh = _unit("box_nms_thresh", box_nms_thresh, low_open=True)
        self.min_mask_region_area = _count("min_mask_region_area", min_mask_region_area, 0)
        if self.min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as e:
                raise ImportError("min_mask_region_area: > 0 needs OpenCV (pip install opencv-python)") from e
        self.shared_encoder = shared_encoder
        self.device = torch.device(device)
        _, generator_cls, predictor_cls = _import_sam()
        if (checkpoint is None) == (model is None):
            raise ValueError("checkpoint/model: give exactly one (a local SAM checkpoint path, or a built Sam model)")
        self.sam_type: Optional[str] = None
        self._encoder_ref: Optional[Tuple[Tuple[int, int], torch.Tensor]] = None  # (signature, patch weights)
        if model is not None:
            sam = self._from_model(model)
        else:
            sam = self._from_checkpoint(checkpoint, model_type)
        self.model = sam.to(self.device).eval()
        self.image_size = int(self.model.image_encoder.img_size)
        pe = self.model.prompt_encoder
        self.embedding_shape = (int(pe.embed_dim),) + tuple(int(s) for s in pe.image_embedding_size)
        self.generator = generator_cls(
            self.model, points_per_side=self.points_per_side, points_per_batch=self.points_per_batch,
            pred_iou_thresh=self.pred_iou_thresh, stability_score_thresh=self.stability_score_thresh,
            box_nms_thresh=self.box_nms_thresh, crop_n_layers=0, min_mask_region_area=self.min_mask_region_area,
            output_mode="binary_mask",
        )
        self._pending: Optional[_Pending] = None
        if shared_encoder:
            self.generator.predictor = _embedding_predictor(predictor_cls)(self.model)
        self.last_seconds: Optional[float] = None
        self.last_count: Optional[int] = None

    # ------------------------------------------------------------------ building
    def _from_model(self, model: nn.Module) -> nn.Module:
        if not all(isinstance(getattr(model, p, None), nn.Module) for p in ("image_encoder", "prompt_encoder", "mask_decoder")):
            raise TypeError(f"model: expected a segment_anything Sam (image_encoder, prompt_encoder, mask_decoder), "
                            f"got {type(model).__name__}")
        enc = model.image_encoder
        if isinstance(getattr(getattr(enc, "patch_embed", None), "proj", None), nn.Module):
            self._encoder_ref = (encoder_signature(enc), enc.patch_embed.proj.weight.detach().cpu().float().clone())
            self.sam_type = _type_name(self._encoder_ref[0])
        if not self.shared_encoder:
            if isinstance(enc, NoImageEncoder):
                raise ValueError("model: a Sam without an image encoder can only run with shared_encoder=True")
            return model
        from segment_anything.modeling import Sam

        return Sam(image_encoder=NoImageEncoder(int(enc.img_size)), prompt_encoder=model.prompt_encoder,
                   mask_decoder=model.mask_decoder, pixel_mean=model.pixel_mean.flatten().tolist(),
                   pixel_std=model.pixel_std.flatten().tolist())

    def _from_checkpoint(self, checkpoint: str, model_type: Optional[str]) -> nn.Module:
        state = load_checkpoint(checkpoint)
        t = checkpoint_type(state, model_type, os.fspath(checkpoint))
        self.sam_type = t.name
        self._encoder_ref = ((t.encoder_dim, t.encoder_depth), state[_PATCH_KEY].float().clone())
        sam = t.build(not self.shared_encoder)
        if self.shared_encoder:
            state = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint: {os.fspath(checkpoint)} does not fit the {t.name} SAM architecture "
                f"({str(e).splitlines()[0][:300]})"
            ) from e
        return sam

    # ------------------------------------------------------------------ shared encoder
    @property
    def wants_image_embeddings(self) -> bool:
        """True in the shared-encoder mode: a host must hand its SAM image embeddings over."""
        return self.shared_encoder

    def check_encoder(self, encoder: nn.Module) -> None:
        """Refuse a host image encoder these decoder weights were not trained with: another width/depth
        (model type), or different patch-embedding weights (another SAM's encoder; compared at bf16
        precision, since hosts keep the frozen encoder in bf16/fp16)."""
        if not self.shared_encoder:
            raise ValueError("shared_encoder: check_encoder is for the shared-encoder mode")
        sig = encoder_signature(encoder)
        img = int(getattr(encoder, "img_size", -1))
        if img != self.image_size:
            raise ValueError(f"encoder: the host's SAM encoder takes {img}-px inputs, the decoder expects {self.image_size}")
        if self._encoder_ref is None:
            return
        ref_sig, ref_w = self._encoder_ref
        if sig != ref_sig:
            raise ValueError(
                f"checkpoint: a {self.sam_type} SAM ({ref_sig[0]}-d, {ref_sig[1]} blocks), but the host's image encoder is "
                f"{_type_name(sig)} ({sig[0]}-d, {sig[1]} blocks); the shared path needs the checkpoint of the host's "
                f"encoder (LISA: sam_vit_h_4b8939.pth)"
            )
        w = encoder.patch_embed.proj.weight.detach().float().cpu()
        bad = int((~torch.isclose(w, ref_w, rtol=2.0 ** -7, atol=1e-6)).sum())
        if bad:
            raise ValueError(
                f"checkpoint: its image encoder is not the host's ({bad} of {w.numel()} patch-embedding weights "
                f"differ beyond bf16 rounding); these decoder weights belong to another encoder"
            )

    def set_embeddings(self, embeddings: torch.Tensor, input_size: Tuple[int, int]) -> None:
        """The host's image embeddings (1, C, h, w) of the next image, and the (h', w') size the image had
        inside the padded encoder input (``padded_input_size``). Used by the next call only."""
        if not self.shared_encoder:
            raise ValueError("shared_encoder: set_embeddings is for the shared-encoder mode (shared_encoder=True)")
        e = embeddings
        if not isinstance(e, torch.Tensor) or e.dim() != 4 or e.shape[0] != 1 or tuple(e.shape[1:]) != self.embedding_shape:
            raise ValueError(
                f"embeddings: expected one image's SAM embeddings (1, {', '.join(map(str, self.embedding_shape))}), got "
                f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}"
            )
        size = tuple(input_size) if isinstance(input_size, (tuple, list)) else None
        if (size is None or len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size)
                or max(size) != self.image_size):
            raise ValueError(
                f"input_size: expected (h', w') with the long side {self.image_size} (ResizeLongestSide), got {input_size!r}"
            )
        dtype = next(self.model.mask_decoder.parameters()).dtype
        self._pending = _Pending(e.detach().to(device=self.device, dtype=dtype), (int(size[0]), int(size[1])))

    def _take_pending(self, image: np.ndarray) -> _Pending:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "embeddings: the shared-encoder SAM source has no image embeddings for this image; the host must "
                "call set_embeddings() before each image (on LISA: its SAM image encoder runs before the LLM)"
            )
        h, w = image.shape[:2]
        want = sam_input_size(h, w, self.image_size)
        if want != pending.input_size:
            raise ValueError(
                f"image: the original image is {h}x{w} (SAM input {want[0]}x{want[1]}), but the embeddings were computed "
                f"from a {pending.input_size[0]}x{pending.input_size[1]} SAM input; image_paths must name the image "
                f"the host encoded"
            )
        return pending

    # ------------------------------------------------------------------ masks
    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = check_image(image)
        h, w = image.shape[:2]
        if self.shared_encoder:
            self.generator.predictor.pending = self._take_pending(image)
        t0 = time.perf_counter()
        try:
            anns = self.generator.generate(image)
        finally:
            if self.shared_encoder:
                self.generator.predictor.pending = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_seconds = time.perf_counter() - t0
        self.last_count = len(anns)
        if not anns:
            return np.zeros((0, h, w), dtype=bool)
        return np.stack([np.asarray(a["segmentation"], dtype=bool) for a in anns])


def _embedding_predictor(predictor_cls):
    """A ``SamPredictor`` whose ``set_image`` takes the pending embeddings instead of encoding: the
    original size and the ResizeLongestSide input size are what ``set_image`` would have set."""

    class EmbeddingPredictor(predictor_cls):
        def __init__(self, sam_model: nn.Module) -> None:
            super().__init__(sam_model)
            self.pending: Optional[_Pending] = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if self.pending is None:
                raise RuntimeError("embeddings: set_image without pending embeddings (use SamMaskSource.__call__)")
            self.reset_image()
            self.original_size = tuple(image.shape[:2])
            self.input_size = self.pending.input_size
            self.features = self.pending.embeddings
            self.is_image_set = True

    return EmbeddingPredictor


__all__ = [
    "NoImageEncoder",
    "SAM_IMAGE_SIZE",
    "SAM_TYPES",
    "SamMaskSource",
    "SamType",
    "checkpoint_type",
    "encoder_signature",
    "load_checkpoint",
    "padded_input_size",
    "sam_input_size",
]
