"""SeGPruner demo: 12 posed RGB-D views -> LLaVA-OneVision with per-view and per-scene selection.

    python -m shared.apps.demo_segpruner --out outputs/segpruner_demo
    python -m shared.apps.demo_segpruner --out DIR --model /path/llava-onevision-qwen2-7b-ov-hf \\
        --scene /data/frames12/scene0011_00 --question "What is in the corner?"

Default: a synthetic ray-cast room (``shared.datasets.make_room_scene``, 12 views of 384x288) and a
tiny random ``LlavaOnevisionForConditionalGeneration`` at LLaVA-OneVision's real geometry (SigLIP
384 px / 14 px: 27x27 = 729 tokens per view + 1 newline; small hidden sizes), on CPU. For the
unpruned model and for SeGPruner ``per_view`` (T per view) and ``per_scene`` (the same T·V
budget for the whole scene) it prints the tokens kept per view, the visual tokens the LLM sees,
the measured prefill time of this model (vision tower, selection, projector and LLM prefill; median
of ``--repeats``) with its speed-up, and the prefill TFLOPs of the same token counts at
Qwen2-7B dims (``shared.accounting``), and writes PNGs: the kept tokens over each view
(``kept_<mode>.png``) and the kept tokens' 3D patch centroids over all patch centroids
(``centroids_3d.png``).

With ``--model`` (a local transformers LLaVA-OneVision folder, >= 4.53) and ``--scene`` (a ScanNet
frame folder or an OpenEQA episode folder; 12 frames sampled with the released rule) the same
command runs the real model on the real scene and also prints the answers. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..accounting import CONVENTIONS, DIMS, Efficiency
from ..hosts.hf_onevision import grid_of, multiview_inputs
from ..hosts.selection import SceneGeometry, geometry_from_views
from ..session import prune
from ..methods.segpruner import SeGPruner

IMAGE_TOKEN = 1000  # the tiny model's <image> id (vocabulary of 1024)


def tiny_onevision(layers: int = 2, hidden: int = 128, seed: int = 0):
    """Random LLaVA-OneVision with the real vision geometry (384 px, 14 px patches, no CLS) and a small Qwen2."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=384, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, max_position_embeddings=16384, pad_token_id=0)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                               video_token_index=IMAGE_TOKEN + 1, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def synthetic_inputs(model, prep, text_before: int = 35, text_after: int = 20, seed: int = 0) -> Dict[str, torch.Tensor]:
    """input_ids with grid²+1 placeholders per view between random text tokens; pixel values of the views."""
    g = torch.Generator().manual_seed(seed)
    v = len(prep.images)
    p = grid_of(model) ** 2
    ids = torch.cat([torch.randint(1, IMAGE_TOKEN, (1, text_before), generator=g), torch.full((1, v * (p + 1)), IMAGE_TOKEN),
                     torch.randint(1, IMAGE_TOKEN, (1, text_after), generator=g)], dim=1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prep.pixel_values(),
                image_sizes=torch.tensor([[prep.size, prep.size]] * v), batch_num_images=torch.tensor([v]))


def real_model(path: str, device: str, dtype: str):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    return model, tok, proc


def load_scene(path: str, views: int, size: int):
    from ..datasets import (list_openeqa_frames, list_scannet_frames, load_openeqa_episode, load_scannet_scene,
                           prepare_views, sample_indices)

    scannet = os.path.isdir(os.path.join(path, "color"))
    ids = list_scannet_frames(path) if scannet else list_openeqa_frames(path)
    chosen = [ids[i] for i in sample_indices(len(ids), views, "released", short="all")]
    scene = (load_scannet_scene if scannet else load_openeqa_episode)(path, frame_ids=chosen, on_invalid_pose="exclude")
    return prepare_views(scene, size=size, padding="mean")


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def timed_prefill(model, inputs, pruner: Optional[SeGPruner], geometry, repeats: int) -> Tuple[float, Any]:
    """Median seconds of one prefill: the stock ``model(**inputs)``, or the same under a SeGPruner session
    (tower, selection, projector, pruned LLM). Returns (seconds, the session's last record or None)."""
    times, record = [], None
    with torch.no_grad():
        for _ in range(repeats):
            with (prune(model, pruner, views=[geometry]) if pruner is not None else contextlib.nullcontext()) as session:
                _sync(model)
                t0 = time.perf_counter()
                model(**inputs, use_cache=False, logits_to_keep=1)
                _sync(model)
                times.append(time.perf_counter() - t0)
            record = session.last if session is not None else None
    return statistics.median(times), record


def plot_kept(prep, keep: torch.Tensor, grid: int, patch: int, title: str, path: str) -> None:
    """Each view with its kept token patches outlined and the others dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    v = len(prep.images)
    cols = min(4, v)
    rows = (v + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i >= v:
            continue
        img = prep.images[i].astype(np.float32) / 255.0
        k = keep[i].reshape(grid, grid).numpy()
        shade = np.kron(k, np.ones((patch, patch)))
        canvas = img.copy()
        h = grid * patch
        canvas[:h, :h] *= (0.25 + 0.75 * shade)[..., None]
        ax.imshow(canvas)
        for r, c in zip(*np.nonzero(k)):
            ax.add_patch(plt.Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, lw=0.6, ec="yellow"))
        ax.set_title(f"view {i}: {int(k.sum())} kept", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_centroids(geometry: SceneGeometry, keeps: Dict[str, torch.Tensor], path: str) -> None:
    """All valid patch centroids (grey) and the kept ones of each mode, in the world frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = geometry.centroids.reshape(-1, 3).double()
    valid = geometry.valid.reshape(-1) if geometry.valid is not None else torch.ones(c.shape[0], dtype=torch.bool)
    fig = plt.figure(figsize=(6 * len(keeps), 5.5))
    for j, (name, keep) in enumerate(keeps.items()):
        ax = fig.add_subplot(1, len(keeps), j + 1, projection="3d")
        allp = c[valid]
        ax.scatter(allp[:, 0], allp[:, 1], allp[:, 2], s=2, c="0.55", alpha=0.35, label=f"all patches with depth ({int(valid.sum())})")
        sel = keep.reshape(-1) & valid
        kp = c[sel]
        ax.scatter(kp[:, 0], kp[:, 1], kp[:, 2], s=6, c="crimson", label=f"kept ({int(sel.sum())} with depth)")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_zlabel("z (m)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tflops(visual: int, text: int) -> float:
    dims = DIMS["qwen2-7b"]
    return Efficiency([visual] * dims.layers, text, dims, CONVENTIONS["fastv"]).tflops


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--model", help="local transformers LLaVA-OneVision folder (default: tiny random model)")
    ap.add_argument("--scene", help="with --model: ScanNet frame folder or OpenEQA episode folder")
    ap.add_argument("--question", default="What objects are in this room?")
    ap.add_argument("--views", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64, help="T per view; per_scene keeps T x views in all")
    ap.add_argument("--ratio", type=float, default=0.5, help="important ratio r")
    ap.add_argument("--lam", type=float, default=0.5, help="λ")
    ap.add_argument("--repeats", type=int, default=2, help="timed prefills per setting (median)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="with --model: answer length")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", help="with --model")
    args = ap.parse_args(argv)
    if bool(args.model) != bool(args.scene):
        ap.error("--model and --scene: give both (real run) or neither (synthetic default)")
    os.makedirs(args.out, exist_ok=True)

    tokenizer = None
    if args.model:
        model, tokenizer, processor = real_model(args.model, args.device, args.dtype)
        size = int(model.config.vision_config.image_size)
        prep = load_scene(args.scene, args.views, size)
        prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  + "<image>" * len(prep.images) + f"{args.question} \n\n<|im_end|>\n<|im_start|>assistant\n")
        from PIL import Image

        inputs = multiview_inputs(model, tokenizer, processor, prompt, [Image.fromarray(im) for im in prep.images])
        source = f"{args.scene} ({len(prep.images)} views), model {args.model}"
    else:
        from ..datasets import make_room_scene, prepare_views

        model = tiny_onevision()
        prep = prepare_views(make_room_scene(n_views=args.views, height=288, width=384), size=384, padding="mean")
        inputs = synthetic_inputs(model, prep)
        source = (f"synthetic ray-cast room ({args.views} views 384x288 -> 384x384 canvas), tiny random "
                  f"LLaVA-OneVision (SigLIP 27x27, Qwen2 {model.config.text_config.num_hidden_layers} layers, "
                  f"hidden {model.config.text_config.hidden_size}), {args.device}")
        model.to(args.device)
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
    grid, patch = grid_of(model), int(model.config.vision_config.patch_size)
    geometry = geometry_from_views(prep, grid=grid, patch=patch, on_invalid_pose="exclude")
    v = len(prep.images)
    p = grid * grid
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = int(inputs["input_ids"].shape[1]) - n_vis
    print(f"SeGPruner demo: {source}")
    print(f"prompt: {n_text} text tokens + {v} views x ({p} grid + 1 newline) = {n_vis} visual tokens\n")

    runs = [("unpruned", None),
            (f"per_view  T={args.tokens}/view", SeGPruner(args.tokens, args.ratio, args.lam, mode="per_view")),
            (f"per_scene T={args.tokens * v}/scene", SeGPruner(args.tokens * v, args.ratio, args.lam, mode="per_scene"))]
    base_t = base_f = None
    keeps: Dict[str, torch.Tensor] = {}
    for name, pruner in runs:
        t, rec = timed_prefill(model, inputs, pruner, geometry, args.repeats)
        if rec is None:
            vis, txt, kept = n_vis, n_text, [p] * v
        else:
            vis = int(rec.stats.visual[0, 0])
            txt, kept = int(rec.stats.tokens[0, 0]) - vis, rec.pre_llm[0]["per_view"]
            keeps[name.split()[0]] = rec.pre_llm[0]["keep"]
        tf = _tflops(vis, txt)
        base_t, base_f = base_t or t, base_f or tf
        print(f"[{name}] (r={args.ratio}, λ={args.lam})" if pruner else f"[{name}]")
        print(f"  kept grid tokens per view: {kept}  (mean {sum(kept) / v:.1f} of {p}: "
              f"{100 * (1 - sum(kept) / (v * p)):.2f}% fewer)")
        print(f"  LLM visual tokens: {vis} (+{txt} text)")
        print(f"  measured prefill of this model: {t * 1000:.1f} ms  (speed-up x{base_t / t:.2f})")
        print(f"  prefill at Qwen2-7B dims: {tf:.2f} TFLOPs (x{base_f / tf:.2f}; 4nd²+2n²d+2ndm, 28 layers)")
        if tokenizer is not None:
            with torch.no_grad(), prune(model, pruner, views=[geometry], patch=patch):
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            print(f"  answer: {tokenizer.decode(new, skip_special_tokens=True).strip()!r}")
        print()
    for mode, keep in keeps.items():
        path = os.path.join(args.out, f"kept_{mode}.png")
        plot_kept(prep, keep, grid, patch, f"SeGPruner {mode}: kept tokens (outlined)", path)
        print(f"wrote {path}")
    path = os.path.join(args.out, "centroids_3d.png")
    plot_centroids(geometry, keeps, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
