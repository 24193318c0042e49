"""Fast3D demo: GAP -> SAP -> a pruned beam-5 generate on a Chat-Scene-shaped scene (nothing downloaded).

    python -m shared.apps.demo_fast3d --out outputs/fast3d_demo

Scene: one synthetic ScanNet-like scene (``shared.datasets.chat_scene_synthetic``: Mask3D boxes, 1024-d
Uni3D and DINOv2 object features, a ScanRefer prompt) in Chat-Scene's 100 object slots x 3 tokens
(identifier, 3D feature, 2D feature; slot i carries object ``assigned_ids[i]``, a seeded permutation).

GAP: a tiny random Fast3D GAP network (``shared.apps.fast3d_tiny``: a random RoBERTa folder with a
hand-written BPE tokenizer in a temp dir, ``GapScorer``) gives one logit per object. SAP: alpha is set so
that k* (the fewest objects whose softmax mass reaches alpha) is about ``--sap-fraction`` of the slots
(``--alpha`` to fix it), and SAP keeps those k* objects' 3k* tokens from layer 0.

Decoder: a **Chat-Scene-shaped stand-in**, not Chat-Scene's model: a tiny random ``LlamaForCausalLM``
fed Chat-Scene's layout ``[p_0 (45 tokens) | 300 object tokens | p_1 | prompt]`` (object tokens built as
``Chat3D.get_object_list_embed`` does: identifier embedding, then random ``Linear-GELU-Linear``
projections of the L2-normalised features; text ids from a word-level stand-in tokenizer) and decoded as
``Chat3D.evaluate`` does (beam 5, repetition penalty 3.0, which with ``inputs_embeds`` only sees the
generated tokens, there as here). The real Chat3D needs the Chat-Scene checkout,
peft and transformers 4.39.3; the command for it is printed at the end (``eval/Chat-Scene/eval.sh``).
Vanilla, SAP, FastV K=2 R=15 and Fast3D GAP K=2 R=15 run through the engine
(``shared.pruning(decoder, method)``; physical drop at layer K, positions kept).

Printed: the GAP logits, k*, alpha and SAP's per-sample pruning ratio; per method the visual tokens each
decoder layer saw, the generated token ids, the prefill FLOPs of the same schedules at Vicuna-7B dims
(``shared.accounting``, FastV's convention) with GAP's own FLOPs added (counted by
``torch.utils.flop_counter.FlopCounterMode`` on the tiny GAP and on a random GAP at the authors' size,
RoBERTa-base + ``GAPConfig()``), and the measured decoder-prefill speed-up of the tiny model. Writes
``<out>/kept_objects.png``: the objects' box centres in 3D coloured by their GAP softmax score, SAP's
kept objects highlighted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..accounting import CONVENTIONS, DIMS, Efficiency, pruning_ratio
from ..engine import pruning
from ..methods import FastV
from ..methods.fast3d import Fast3D, sap_object_counts

SYSTEM_TOKENS = 45  # len(p_0) with BOS under Vicuna's tokenizer (Chat3D.prepare_fixed_embed)
GROUP = 3  # identifier + 3D feature + 2D feature per object slot
TEXT_VOCAB = 924  # ids below this are text; the slots' <OBJxxx> identifiers follow
BOS, EOS, PAD = 1, 2, 0
#: Chat3D.evaluate's generate settings (models/chat3d.py)
GENERATE = dict(num_beams=5, min_length=1, repetition_penalty=3.0, length_penalty=1.0, do_sample=False)


@dataclass
class Scene:
    """One scene in Chat-Scene's slot layout.

    obj_feats / obj_img_feats: (slots, 1024) float32 per object id (zeros past the instances, as
    Chat-Scene pads); locs: (instances, 6) Mask3D box centre + size (m); labels: per instance."""

    scene_id: str
    prompt: str
    obj_feats: torch.Tensor
    obj_img_feats: torch.Tensor
    locs: torch.Tensor
    labels: List[str]

    @property
    def slots(self) -> int:
        return int(self.obj_feats.shape[0])

    @property
    def instances(self) -> int:
        return int(self.locs.shape[0])


def synthetic_scene(root: str, slots: int = 100, objects: int = 100, seed: int = 0) -> Scene:
    """Write one synthetic Chat-Scene scene under ``root`` and read it back into ``slots`` object slots:
    ``objects`` Mask3D instances (2 <= objects <= slots), its first ScanRefer prompt."""
    from ..datasets.chat_scene_synthetic import (ANNOTATIONS, FEATS, IMG_FEATS, INSTANCE_ATTRIBUTES,
                                                 write_chat_scene_annotations)

    if isinstance(objects, bool) or not isinstance(objects, int) or not 2 <= objects <= slots:
        raise ValueError(f"objects: expected an int in [2, {slots}] (Mask3D instances within the slots), got {objects!r}")
    data = write_chat_scene_annotations(root, scenes=1, instances=objects, gt_objects=min(12, objects), per_task=1,
                                        seed=seed)
    sid = data.scenes[0]
    feats = torch.load(data.path(FEATS), weights_only=True)
    img = torch.load(data.path(IMG_FEATS), weights_only=True)
    attrs = torch.load(data.path(INSTANCE_ATTRIBUTES), weights_only=True)[sid]
    obj_feats = torch.zeros(slots, 1024)
    obj_img = torch.zeros(slots, 1024)
    for k in range(objects):
        obj_feats[k] = feats[f"{sid}_{k:02}"].float()
        obj_img[k] = img[f"{sid}_{k:02}"].float()
    with open(data.path(ANNOTATIONS["scanrefer"]), encoding="utf-8") as f:
        prompt = json.load(f)[0]["prompt"]
    return Scene(sid, prompt, obj_feats, obj_img, attrs["locs"].float(), list(attrs["objects"]))


def word_ids(text: str) -> List[int]:
    """Stand-in tokenizer: one id per word or punctuation mark (crc32 into the text vocabulary)."""
    return [3 + zlib.crc32(w.encode()) % (TEXT_VOCAB - 3) for w in re.findall(r"\w+|[^\w\s]", text)]


class ChatSceneStandIn(nn.Module):
    """A tiny random LLaMA with Chat3D's object projections (``object_proj``/``object_img_proj``:
    Linear(1024, d) -> GELU -> Linear(d, d)) and ``slots`` ``<OBJxxx>`` identifier tokens."""

    def __init__(self, slots: int = 100, layers: int = 8, hidden: int = 256, heads: int = 8, seed: int = 0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=round(hidden * 11008 / 4096), num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=TEXT_VOCAB + slots,
                          max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
        torch.manual_seed(seed)
        self.llm = LlamaForCausalLM(cfg).eval()
        self.object_proj = nn.Sequential(nn.Linear(1024, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.object_img_proj = nn.Sequential(nn.Linear(1024, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.slots = slots

    @property
    def decoder(self) -> nn.Module:
        return self.llm.model

    @property
    def layers(self) -> int:
        return int(self.llm.config.num_hidden_layers)

    @torch.no_grad()
    def wrapped_embed(self, scene: Scene, assigned_ids: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, int, int]:
        """``[p_0 | objects | p_1 | prompt]`` as ``Chat3D.evaluate`` builds it. Returns (1, L, d) embeddings,
        vis_start (= 45), vis_len (= slots x 3)."""
        emb = self.llm.get_input_embeddings()
        g = torch.Generator().manual_seed(seed)
        p0 = torch.cat([torch.tensor([BOS]), torch.randint(3, TEXT_VOCAB, (SYSTEM_TOKENS - 1,), generator=g)])
        p1 = torch.tensor(word_ids("]. USER:"))
        prompt = torch.tensor(word_ids(f" {scene.prompt} ASSISTANT:"))
        f3 = nn.functional.normalize(scene.obj_feats[assigned_ids], dim=-1)
        f2 = nn.functional.normalize(scene.obj_img_feats[assigned_ids], dim=-1)
        ident = emb(TEXT_VOCAB + torch.arange(self.slots))
        objects = torch.stack([ident, self.object_proj(f3), self.object_img_proj(f2)], dim=1).reshape(-1, ident.shape[-1])
        x = torch.cat([emb(p0), objects, emb(p1), emb(prompt)])[None]
        return x, SYSTEM_TOKENS, int(objects.shape[0])


# ----------------------------------------------------------------------------------------------- runs
def alpha_for(logits: torch.Tensor, k: int) -> float:
    """An alpha (6 decimals) halfway between the softmax mass of the top k-1 and of the top k objects, so
    SAP keeps k of them."""
    mass = torch.softmax(logits.double(), 0).sort(descending=True).values.cumsum(0)
    lo = float(mass[k - 2]) if k >= 2 else 0.0
    return round((lo + float(mass[k - 1])) / 2, 6)


def generate(model: ChatSceneStandIn, x: torch.Tensor, span: Tuple[int, int], method, selection,
             max_new_tokens: int) -> Tuple[List[int], List[int], List[int]]:
    """Beam-5 generate (Chat3D's settings); stock without a method, else through the engine.
    Returns (generated ids, visual tokens per decoder layer at prefill, the visual positions kept at the
    last pruning stage; [] when nothing was pruned)."""
    kw = dict(GENERATE, max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=EOS)
    mask = torch.ones(x.shape[:2], dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        # as in Chat3D.evaluate: with inputs_embeds only, the penalty sees the generated tokens only
        warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds")
        if method is None:
            out = model.llm.generate(inputs_embeds=x, attention_mask=mask, **kw)
            return out[0].tolist(), [span[1] - span[0]] * model.layers, []
        with pruning(model.decoder, method) as eng, eng.generation():
            eng.prepare(visual_spans=[span], visual_selection=None if selection is None else [selection])
            out = model.llm.generate(inputs_embeds=x, attention_mask=mask, **kw)
            stats = eng.last_stats
            kept = stats.stages[-1][1][0].tolist() if len(stats.stages) > 1 else []
            return out[0].tolist(), stats.visual[0].tolist(), kept


def timed_prefills(model: ChatSceneStandIn, x: torch.Tensor, span: Tuple[int, int],
                   runs: Dict[str, Tuple[object, Optional[torch.Tensor]]], repeats: int) -> Dict[str, float]:
    """Median seconds of one decoder prefill (no cache) per run, the runs interleaved round-robin."""
    times: Dict[str, List[float]] = {name: [] for name in runs}

    def once(method, selection) -> float:
        if method is None:
            t0 = time.perf_counter()
            model.decoder(inputs_embeds=x, use_cache=False)
            return time.perf_counter() - t0
        with pruning(model.decoder, method) as eng:
            eng.prepare(visual_spans=[span], visual_selection=None if selection is None else [selection])
            t0 = time.perf_counter()
            model.decoder(inputs_embeds=x, use_cache=False)
            return time.perf_counter() - t0

    with torch.no_grad():
        for name, (m, s) in runs.items():  # warm-up
            once(m, s)
        for r in range(repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[name].append(once(*runs[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def plot_kept_objects(scene: Scene, probs: torch.Tensor, kept: Sequence[int], title: str, path: str) -> None:
    """The instances' box centres in 3D, coloured by GAP softmax score; ``kept`` object ids ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = scene.instances
    c = scene.locs[:, :3].numpy()
    p = probs[:n].numpy()
    is_kept = torch.zeros(n, dtype=torch.bool)
    real_kept = [k for k in kept if k < n]
    is_kept[real_kept] = True
    fig = plt.figure(figsize=(7.5, 6.2))
    ax = fig.add_subplot(111, projection="3d")
    rest = (~is_kept).numpy()
    sc = ax.scatter(c[rest, 0], c[rest, 1], c[rest, 2], c=p[rest], cmap="viridis", vmin=float(p.min()),
                    vmax=float(p.max()), s=22, alpha=0.8, label=f"pruned ({int(rest.sum())})")
    kk = is_kept.numpy()
    ax.scatter(c[kk, 0], c[kk, 1], c[kk, 2], c=p[kk], cmap="viridis", vmin=float(p.min()), vmax=float(p.max()),
               s=140, edgecolors="crimson", linewidths=1.8, depthshade=False, label=f"kept by SAP ({len(real_kept)})")
    for k in real_kept:
        ax.text(c[k, 0], c[k, 1], c[k, 2] + 0.12, f"{k}:{scene.labels[k]}", fontsize=7, color="crimson")
    fig.colorbar(sc, ax=ax, shrink=0.6, pad=0.1, label="GAP softmax score")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_tokens(v: Sequence[int]) -> str:
    return str(list(v))


def _quiet_transformers() -> None:
    """No weight-loading progress bars for the temp RoBERTa folder."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):  # pragma: no cover - older transformers
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="outputs/fast3d_demo", help="folder for kept_objects.png")
    ap.add_argument("--slots", type=int, default=100, help="object slots (Chat-Scene's max_obj_num: 100)")
    ap.add_argument("--objects", type=int, default=100, help="Mask3D instances in the scene (<= slots; zero-padded)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the stand-in LLaMA")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the stand-in LLaMA")
    ap.add_argument("--sap-fraction", type=float, default=0.10, help="alpha is set so k* is this share of the slots")
    ap.add_argument("--alpha", type=float, default=None, help="SAP's alpha instead (Fast3D's released value: 0.21)")
    ap.add_argument("--layer", type=int, default=2, help="K of FastV and Fast3D GAP")
    ap.add_argument("--keep", type=int, default=15, help="R of FastV and Fast3D GAP (visual tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills per method (median)")
    ap.add_argument("--identity-object-ids", action="store_true", help="slot i holds object i (Fast3D's protocol)")
    ap.add_argument("--authors-gap", default="count", choices=("count", "skip"),
                    help="count: FLOPs of a random GAP at the authors' size (RoBERTa-base; ~10 s on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 < args.sap_fraction <= 1.0:
        ap.error(f"--sap-fraction: expected a share in (0, 1], got {args.sap_fraction}")
    if args.slots < 2:
        ap.error(f"--slots: expected >= 2, got {args.slots}")
    os.makedirs(args.out, exist_ok=True)
    from torch.utils.flop_counter import FlopCounterMode

    from .fast3d_tiny import tiny_gap_scorer, write_roberta

    _quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        scene = synthetic_scene(os.path.join(tmp, "annotations"), args.slots, args.objects, args.seed)
        scorer = tiny_gap_scorer(write_roberta(os.path.join(tmp, "roberta"), seed=args.seed), n_obj=args.slots,
                                 seed=args.seed)
    model = ChatSceneStandIn(args.slots, args.layers, args.hidden, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    assigned = torch.arange(args.slots) if args.identity_object_ids else torch.randperm(args.slots, generator=g)
    x, vis_start, vis_len = model.wrapped_embed(scene, assigned, seed=args.seed)
    span = (vis_start, vis_start + vis_len)
    n_text = int(x.shape[1]) - vis_len
    L = model.layers
    print(f"Fast3D demo: synthetic scene {scene.scene_id} ({scene.instances} Mask3D instances in {args.slots} slots "
          f"x {GROUP} tokens, 1024-d Uni3D + DINOv2 features)")
    print(f"prompt (ScanRefer): {scene.prompt!r}")
    print(f"decoder: a Chat-Scene-shaped STAND-IN, not Chat-Scene's model: tiny random LlamaForCausalLM ({L} layers, "
          f"hidden {args.hidden}) on Chat-Scene's layout [p_0 {vis_start} | {vis_len} object tokens | "
          f"p_1 + prompt {n_text - vis_start}] = {x.shape[1]} tokens; beam {GENERATE['num_beams']}, repetition penalty "
          f"{GENERATE['repetition_penalty']} (random weights: the ids show the runs, not answers); slots carry objects "
          f"{'in order (identity ids)' if args.identity_object_ids else 'permuted (seeded randperm, as Chat-Scene)'}\n")

    # ------------------------------------------------------------------ GAP
    gap_in = dict(prompt=scene.prompt, obj_feats=scene.obj_feats, obj_img_feats=scene.obj_img_feats, locs=scene.locs)
    with FlopCounterMode(display=False) as fc:
        logits = scorer(**gap_in)
    gap_tiny_flops = float(fc.get_total_flops())
    gap_times = []
    with torch.no_grad():
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            scorer(**gap_in)
            gap_times.append(time.perf_counter() - t0)
    gap_tiny_s = statistics.median(gap_times)
    probs = torch.softmax(logits.double(), 0)
    print(f"GAP (tiny random: RoBERTa hidden 32 + spatial transformer width 32): {gap_tiny_flops / 1e6:.2f} MFLOPs "
          f"(FlopCounterMode), {1000 * gap_tiny_s:.1f} ms")
    print("GAP logits per object id (row: ids 10r..10r+9):")
    for r in range(0, args.slots, 10):
        print(f"  {r:3d}: " + " ".join(f"{float(v):.4f}" for v in logits[r:r + 10]))

    # ------------------------------------------------------------------ SAP
    target = max(1, round(args.sap_fraction * args.slots))
    alpha = args.alpha if args.alpha is not None else alpha_for(logits, target)
    sap = Fast3D(layer=0, alpha=alpha)
    sap_sel, info = sap.host_selection(vis_len, group=GROUP, slot_to_object=assigned, object_scores=logits)
    k_star = int(info["objects_kept"])
    assert k_star == int(sap_object_counts(logits, alpha))
    kept_slots = sap_sel[::GROUP] // GROUP
    kept_objects = sorted(int(assigned[s]) for s in kept_slots)
    sap_ratio = pruning_ratio(sap.schedule(vis_len, L, kept=info["budget"]), vis_len)
    how = "given" if args.alpha is not None else f"set for k* ~ {args.sap_fraction:.0%} of {args.slots} objects"
    print(f"\nSAP: alpha = {alpha} ({how}); k* = {k_star} objects (R = {info['budget']} tokens from layer 0); "
          f"per-sample pruning ratio {sap_ratio:.4f}")
    print(f"  kept object ids: {kept_objects} (softmax mass {float(probs[kept_objects].sum()):.4f})"
          + (f"; {sum(k >= scene.instances for k in kept_objects)} of them padding slots"
             if scene.instances < args.slots else ""))

    # ------------------------------------------------------------------ runs
    gap_sel, _ = Fast3D(layer=args.layer, keep=args.keep).host_selection(
        vis_len, group=GROUP, slot_to_object=assigned, object_scores=logits)
    runs: Dict[str, Tuple[object, Optional[torch.Tensor]]] = {
        "vanilla": (None, None),
        f"Fast3D SAP K=0 alpha={alpha}": (sap, sap_sel),
        f"FastV K={args.layer} R={args.keep}": (FastV(layer=args.layer, keep=args.keep), None),
        f"Fast3D GAP K={args.layer} R={args.keep}": (Fast3D(layer=args.layer, keep=args.keep), gap_sel),
    }
    # the same methods at Vicuna-7B depth (32 layers), for the FLOPs
    at_7b = {
        "vanilla": [vis_len] * 32,
        f"Fast3D SAP K=0 alpha={alpha}": sap.schedule(vis_len, 32, kept=info["budget"]),
        f"FastV K={args.layer} R={args.keep}": FastV(layer=args.layer, keep=args.keep).schedule(vis_len, 32),
        f"Fast3D GAP K={args.layer} R={args.keep}": Fast3D(layer=args.layer, keep=args.keep).schedule(vis_len, 32),
    }
    gap_authors = None
    if args.authors_gap == "count":
        from ..methods.fast3d_gap import authors_size_gap, gap_cost

        words = len(word_ids(scene.prompt)) + 2  # + <s> </s>
        gap_authors = gap_cost(authors_size_gap(args.slots), text_tokens=words, repeats=0)[0]
        print(f"\nGAP at the authors' size (random RoBERTa-base + GAPConfig(), {args.slots} objects, a {words}-token "
              f"prompt): {gap_authors / 1e9:.2f} GFLOPs (FlopCounterMode, 2 per multiply-add) = "
              f"{gap_authors / 2e9:.2f} G multiply-adds; added below to Fast3D's rows in FastV's convention "
              f"(1 per multiply-add)")
    times = timed_prefills(model, x, span, runs, args.repeats)
    base_t = times["vanilla"]
    dims, conv = DIMS["llama-7b"], CONVENTIONS["fastv"]
    base_f = Efficiency(at_7b["vanilla"], n_text, dims, conv, visual_tokens=vis_len).flops
    print()
    for name, (method, sel) in runs.items():
        ids, vis, kept_pos = generate(model, x, span, method, sel, args.max_new_tokens)
        eff = Efficiency(at_7b[name], n_text, dims, conv, visual_tokens=vis_len)
        uses_gap = name.startswith("Fast3D")
        extra = gap_authors / 2 if (uses_gap and gap_authors is not None) else 0.0
        t = times[name]
        print(f"[{name}]")
        print(f"  visual tokens per layer: {_fmt_tokens(vis)}  (pruning ratio {pruning_ratio(vis, vis_len):.4f})")
        if kept_pos:
            print(f"  kept visual positions: {kept_pos}")
        print(f"  generated ids: {ids}")
        flops = f"  at Vicuna-7B dims: {eff.tflops:.3f} TFLOPs decoder prefill (4nd²+2n²d+2ndm, 32 layers"
        if uses_gap and gap_authors is not None:
            flops += f"; + GAP {extra / 1e12:.4f} = {(eff.flops + extra) / 1e12:.3f}"
        elif uses_gap:
            flops += "; GAP not counted: --authors-gap skip"
        print(flops + f"), x{base_f / (eff.flops + extra):.2f} vs vanilla")
        line = f"  measured decoder prefill of the stand-in: {1000 * t:.2f} ms (speed-up x{base_t / t:.2f})"
        if uses_gap:
            line += f"; with the tiny GAP online ({1000 * gap_tiny_s:.1f} ms): x{base_t / (t + gap_tiny_s):.2f}"
        print(line + "\n")

    title = (f"{scene.scene_id}: SAP keeps k* = {k_star} of {args.slots} objects "
             f"(alpha = {alpha}, pruning ratio {sap_ratio:.2f})\ncolour: GAP softmax score (tiny random GAP)")
    path = os.path.join(args.out, "kept_objects.png")
    plot_kept_objects(scene, probs.float(), kept_objects, title, path)
    print(f"wrote {path}")
    print("\nThe real host (Chat-Scene's Chat3D on Vicuna-7B; needs the patched Chat-Scene checkout, peft and "
          "transformers 4.39.3, a GPU, the checkpoint, annotations and a trained GAP):")
    print("  bash eval/Chat-Scene/eval.sh scanrefer --llm llm/vicuna-7b-v1.5 --ckpt ckpt/ckpt_01_3446.pth "
          "--anno-root annotations --out out/chatscene/sap --method fast3d --method-args layer=0 alpha=0.21 "
          "--gap-checkpoint gap/checkpoint_best.pth --roberta roberta-base")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
