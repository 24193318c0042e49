"""A tiny REAL LLaVA-3D (the patched fork's own classes, random weights) and synthetic posed RGB-D scenes
in the files LLaVA-3D's ``RGBDVideoProcessor`` reads. Test-only; no hub access.

API (also used by the LLaVA-3D eval driver's tests)::

    from tests.hosts import upstream, llava_3d_build as lb
    tree = upstream.tree_or_skip("LLaVA-3D")         # patched tree (submodule only: no snapshot exists)
    model, tokenizer, processor = lb.build_tiny_llava3d(tmp_dir, tree)
    batch = lb.synthetic_scene_batch(tokenizer, processor, [lb.scene_path(tmp_dir, 0)], ["What is on the table?"])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)      # batch: inputs, images, depths, ...

- ``import_llava3d(tree)``: installs the ``torch_scatter`` shim (below), puts the tree first on ``sys.path``
  and imports ``llava`` (LLaVA-3D's ``llava/__init__.py`` imports the model without a try, so a broken
  patch raises).
- ``build_tiny_llava3d(tmp_dir, tree, layers=4, views=4, scenes=2, seed=0, attn=None)``: writes ``scenes``
  synthetic rooms (``write_scenes``) and LLaVA-3D's annotation file
  ``tmp_dir/playground/data/annotations/embodiedscan_infos_full.json`` (opened CWD-relative by
  ``RGBDVideoProcessor.__init__``: construction runs with ``tmp_dir`` as CWD), a tiny CLIP ViT (2 layers,
  32-d, 84 px / 14 px: 6 x 6 = 36 patches per view) with its ``CLIPImageProcessor`` saved in
  ``tmp_dir/clip`` (the ``mm_vision_tower``), and a LLaMA-style sentencepiece tokenizer trained on the
  ``llava_v1`` template and the questions (``tmp_dir/tokenizer``). Then ``LlavaLlamaForCausalLM(LlavaConfig)``
  (LLaMA 4 x 64-d, 4 heads, vocab of the tokenizer; ``mm_video_tower="SpatialAwareModule"``, ``mlp2x_gelu``
  projector 32 -> 64, ``mm_vision_select_layer=-2``, ``num_frames=views``) builds the towers through
  LLaVA-3D's own ``build_vision_tower``/``build_video_tower``; the CLIP tower is loaded as
  ``load_pretrained_model`` does (``vision_tower.load_model()``). LLaVA-3D hard-codes two widths for the 7B
  model: ``SpatialAwareModule()`` adds a 1024-d position embedding to the CLIP features and
  ``PromptEncoder()`` makes 4096-d click tokens; both are rebuilt with their own classes at the tiny widths
  (``SpatialAwareModule(latent_dim=32)``, ``PromptEncoder(latent_dim=64)``). fp32, eval mode, seeded.
  Returns ``(model, tokenizer, processor)`` (processor: the model's ``RGBDVideoProcessor``).
- ``scene_path(tmp_dir, i)``: the video path of scene i (``<tmp_dir>/data/scannet/scene000i_00``), as the
  eval scripts pass ``os.path.join(video_folder, "scannet/sceneXXXX_XX")``.
- ``synthetic_scene_batch(tokenizer, processor, videos, questions, clicks=None, conv_mode="llava_v1")``:
  ``model.generate`` / ``model(...)`` keyword arguments as ``llava/eval/model_scanqa.py`` builds them:
  ``inputs`` (B, L) long (``tokenizer_image_token`` / ``tokenizer_special_token`` with ``<boxes>``
  -> ``LOC_TOKEN_INDEX``; right-padded with ``attention_mask`` when B > 1), ``images`` (B, V, 3, 84, 84),
  ``depths`` (B, V, 84, 84) metres, ``poses`` (B, V, 4, 4) axis-aligned cam-to-world, ``intrinsics``
  (B, V, 4, 4) from ``llava.mm_utils.process_videos``, and ``clicks`` (n, 3) when given (one per
  ``<boxes>``, in order).

The ``torch_scatter`` shim (test-only; PyPI has no wheel of it): a module whose ``scatter_mean(src, index,
dim=0)`` is ``torch.Tensor.scatter_reduce(dim, index, src, "mean", include_self=False)`` on zeros of
``index.max() + 1`` rows, all ``video_encoder.py`` uses. It is installed only when no real ``torch_scatter``
is importable.
"""
from __future__ import annotations

import json
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import upstream

CLIP_DIM, CLIP_SIZE, CLIP_PATCH = 32, 84, 14
HIDDEN, INTER, HEADS = 64, 128, 4
IMAGE_TOKEN_INDEX, LOC_TOKEN_INDEX = -200, -300
QUESTIONS = ("What is on the table?", "What color is the chair next to the door?",
             "How many boxes are in the room?", "Where is the lamp?", "Describe the object at <boxes>.")
ANNOTATIONS = Path("playground") / "data" / "annotations" / "embodiedscan_infos_full.json"


# ----------------------------------------------------------------------------------- imports
def torch_scatter_shim() -> types.ModuleType:
    """A stand-in ``torch_scatter`` with ``scatter_mean`` (see the module docstring)."""
    mod = types.ModuleType("torch_scatter")

    def scatter_mean(src: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if dim != 0 or index.dim() != 1:
            raise NotImplementedError("torch_scatter shim: only scatter_mean(src, 1-D index, dim=0)")
        out = src.new_zeros((int(index.max()) + 1,) + tuple(src.shape[1:]))
        idx = index.view(-1, *([1] * (src.dim() - 1))).expand_as(src)
        return out.scatter_reduce(0, idx, src, reduce="mean", include_self=False)

    mod.scatter_mean = scatter_mean
    mod.__file__ = __file__
    return mod


def import_llava3d(tree: upstream.PatchedTree):
    """Import the patched LLaVA-3D ``llava`` package from ``tree`` (with the torch_scatter shim if needed)."""
    import importlib.util

    if "torch_scatter" not in sys.modules and importlib.util.find_spec("torch_scatter") is None:
        sys.modules["torch_scatter"] = torch_scatter_shim()
    upstream.use_tree(tree.path, upstream.PACKAGES["LLaVA-3D"])
    import llava  # noqa: F401  (imports llava.model.language_model.llava_llama)
    import llava.mm_utils  # noqa: F401

    return llava


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ------------------------------------------------------------------------------------ scenes
def scene_id(i: int) -> str:
    return f"scene{i:04d}_00"


def scene_path(tmp_dir: os.PathLike, i: int) -> str:
    """The video path of scene ``i`` as LLaVA-3D's eval passes it (``<folder>/scannet/sceneXXXX_XX``)."""
    return str(Path(tmp_dir) / "data" / "scannet" / scene_id(i))


def write_scenes(tmp_dir: os.PathLike, scenes: int = 2, views: int = 4, seed: int = 0) -> Path:
    """Write ``scenes`` synthetic rooms (``shared.datasets.make_room_scene``, 96 x 128 px, seeds seed + i)
    in EmbodiedScan's ScanNet layout: ``data/scannet/posed_images/<scene>/<frame>.jpg`` colour,
    ``<frame>.png`` uint16 depth in mm, and the annotation json (per scene: frame -> {pose (4x4 cam2world),
    depth}, ``intrinsic``/``depth_intrinsic`` 4x4, ``axis_align_matrix`` (a yaw of 30° and a shift)).
    Returns the json path."""
    from PIL import Image

    from shared.datasets import make_room_scene

    root = Path(tmp_dir)
    info = {}
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    align = np.array([[c, -s, 0, 0.4], [s, c, 0, -0.3], [0, 0, 1, 0.1], [0, 0, 0, 1]])
    for i in range(scenes):
        sc = make_room_scene(n_views=views, height=96, width=128, seed=seed + i)
        folder = root / "data" / "scannet" / "posed_images" / scene_id(i)
        folder.mkdir(parents=True, exist_ok=True)
        entry = {}
        for v in range(views):
            rel = f"scannet/posed_images/{scene_id(i)}/{v:05d}"
            Image.fromarray(sc.rgb[v]).save(root / "data" / f"{rel}.jpg", quality=95)
            mm = np.round(sc.depth[v].numpy().astype(np.float64) * 1000.0).clip(0, 65535).astype(np.uint16)
            Image.fromarray(mm).save(root / "data" / f"{rel}.png")
            entry[f"{rel}.jpg"] = {"pose": sc.cam2world[v].double().tolist(), "depth": f"{rel}.png"}
        k = np.eye(4)
        k[:3, :3] = sc.K[0].double().numpy()
        entry.update(intrinsic=k.tolist(), depth_intrinsic=k.tolist(), axis_align_matrix=align.tolist())
        info[f"scannet/{scene_id(i)}"] = entry
    path = root / ANNOTATIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return path


# ----------------------------------------------------------------------------------- model
def _tokenizer(tree: upstream.PatchedTree, out: Path):
    from transformers import LlamaTokenizer

    from .lisa_build import train_tokenizer
    from llava.conversation import conv_templates

    conv = conv_templates["llava_v1"]
    lines = [conv.system, "USER: ASSISTANT:", *QUESTIONS, "the table chair door lamp box red blue green"] * 8
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer.model", lines)
    tok = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=True)  # as Vicuna-v1.5's (no protobuf needed)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(out)
    return tok


def _clip(out: Path, seed: int) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=2 * CLIP_DIM, num_hidden_layers=2,
                           num_attention_heads=2, image_size=CLIP_SIZE, patch_size=CLIP_PATCH, projection_dim=CLIP_DIM)
    torch.manual_seed(seed)
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE}, crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(out)
    return out


def build_tiny_llava3d(tmp_dir: os.PathLike, tree: upstream.PatchedTree, layers: int = 4, views: int = 4,
                       scenes: int = 2, seed: int = 0, attn: Optional[str] = None):
    """See the module docstring. ``attn``: force ``config._attn_implementation`` ("eager"/"sdpa"); default
    transformers' own choice, as ``load_pretrained_model`` leaves it. Returns (model, tokenizer, processor)."""
    import_llava3d(tree)
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
    from llava.model.multimodal_encoder.spatial_aware_module import SpatialAwareModule
    from llava.model.multimodal_encoder.video_encoder import PromptEncoder

    root = Path(tmp_dir)
    write_scenes(root, scenes=scenes, views=views, seed=seed)
    tok = _tokenizer(tree, root / "tokenizer")
    clip = _clip(root / "clip", seed)
    cfg = LlavaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, mm_vision_tower=str(clip.resolve()), mm_video_tower="SpatialAwareModule", mm_hidden_size=CLIP_DIM,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False, num_frames=views,
        num_sample_tokens=1152, tokenizer_padding_side="right", use_cache=True,
    )
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with _cwd(root):
        model = LlavaLlamaForCausalLM(cfg)
    inner = model.get_model()
    inner.get_vision_tower().load_model()
    vt = inner.get_video_tower()
    torch.manual_seed(seed + 1)
    vt.video_tower = SpatialAwareModule(latent_dim=CLIP_DIM)
    vt.prompt_encoder = PromptEncoder(latent_dim=HIDDEN)
    model.to(torch.float32).eval()
    return model, tok, vt.video_processor


# ------------------------------------------------------------------------------------ inputs
def prompt_ids(tokenizer, question: str, conv_mode: str = "llava_v1") -> torch.Tensor:
    """(L,) ids of ``<image>\\n{question}`` in the conversation template, as the eval scripts build them
    (``tokenizer_special_token`` when the question holds ``<boxes>``)."""
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token, tokenizer_special_token

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    if "<boxes>" in prompt:
        return tokenizer_special_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, LOC_TOKEN_INDEX, return_tensors="pt")
    return tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")


def synthetic_scene_batch(tokenizer, processor, videos: Sequence[str], questions: Sequence[str],
                          clicks: Optional[Sequence[Sequence[float]]] = None, conv_mode: str = "llava_v1") -> dict:
    """Keyword arguments of ``model.generate`` for B = len(videos) scenes (see the module docstring)."""
    from llava.mm_utils import process_videos

    if len(videos) != len(questions):
        raise ValueError(f"questions: expected one per video ({len(videos)}), got {len(questions)}")
    ids = [prompt_ids(tokenizer, q, conv_mode) for q in questions]
    length = max(int(x.shape[0]) for x in ids)
    inputs = torch.full((len(ids), length), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.bool)
    for b, x in enumerate(ids):
        inputs[b, : x.shape[0]] = x
        mask[b, : x.shape[0]] = True
    vids = process_videos(list(videos), processor, mode="random")
    out = dict(inputs=inputs, images=vids["images"], depths=vids["depths"], poses=vids["poses"],
               intrinsics=vids["intrinsics"])
    if len(ids) > 1:
        out["attention_mask"] = mask
    n_loc = int((inputs == LOC_TOKEN_INDEX).sum())
    if n_loc:
        if clicks is None or len(clicks) != n_loc:
            raise ValueError(f"clicks: the prompts hold {n_loc} <boxes>; give one (x, y, z) per box, got {clicks!r}")
        out["clicks"] = torch.tensor(clicks, dtype=torch.float32).reshape(n_loc, 3)
    return out


#: what LLaVA-3D's model and processor import beyond torch (cv2 and scipy: its video processor)
REQUIRED_MODULES = ("cv2", "scipy", "sentencepiece", "PIL")


def require_environment() -> None:
    """Skip (or fail under HOST_TESTS_REQUIRED=1) unless transformers 4.37.2 and LLaVA-3D's imports are here."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        upstream.unavailable("LLaVA-3D needs transformers 4.37.2 (PYTHONPATH=.venvs/tf-4.37.2)")
    import transformers

    if transformers.__version__ != "4.37.2":
        upstream.unavailable(f"LLaVA-3D pins transformers 4.37.2, this is {transformers.__version__} "
                             "(PYTHONPATH=.venvs/tf-4.37.2 .venvs/yolo/bin/python -m pytest ...)")
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        upstream.unavailable(f"LLaVA-3D's imports need {missing} (.venvs/yolo + the tf-4.37.2 target)")


__all__ = [
    "REQUIRED_MODULES",
    "require_environment",
    "ANNOTATIONS",
    "QUESTIONS",
    "build_tiny_llava3d",
    "import_llava3d",
    "prompt_ids",
    "scene_path",
    "synthetic_scene_batch",
    "torch_scatter_shim",
    "write_scenes",
]
