"""Fast3D's global attention prediction (GAP) network: one logit per scene object for a prompt.

    model, tokenizer = load_gap("checkpoint_best.pth", "/models/roberta-base")
    logits = gap_logits(model, tokenizer, prompts, obj_feats, obj_img_feats, locs)   # (B, n_obj)

Architecture (defaults = the authors' config): RoBERTa-base encodes the raw task prompt →
``text_projector``; per object cat(Uni3D 1024, DINOv2 1024) → ``obj_feat_projector`` + a learned
object-id embedding (one row per object slot); the spatial transformer ``mm_encoder``
(``shared.methods.fast3d_cmt``) with the box locations; head Linear → ReLU → LayerNorm → Dropout →
Linear. The state-dict layout is the authors' (``Fast3dNet``), so their released checkpoints load
with ``strict=True``; the object features enter raw (no normalisation), as in their data pipeline.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .fast3d_cmt import CMT, CMTConfig


@dataclass
class GAPConfig:
    """Sizes of the GAP network. ``max_obj_num`` is the number of object slots n_obj every scene must
    have (the rows of the object-id embedding); ``text_hidden_size`` must match the text encoder."""

    feat_dim: int = 1024
    img_feat_dim: int = 1024
    text_hidden_size: int = 768
    max_obj_num: int = 100
    head_dropout: float = 0.3
    cmt: CMTConfig = field(default_factory=CMTConfig)

    def __post_init__(self) -> None:
        if isinstance(self.cmt, Mapping):
            self.cmt = CMTConfig(**self.cmt)
        for name in ("feat_dim", "img_feat_dim", "text_hidden_size", "max_obj_num"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not 0.0 <= float(self.head_dropout) < 1.0:
            raise ValueError(f"head_dropout: expected a probability in [0, 1), got {self.head_dropout!r}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GAPConfig":
        return cls(**dict(d))


class GAPNet(nn.Module):
    """The GAP network around a given text encoder (a transformers ``RobertaModel``)."""

    def __init__(self, config: GAPConfig, text_encoder: nn.Module) -> None:
        super().__init__()
        hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
        if hidden != config.text_hidden_size:
            raise ValueError(
                f"text_encoder: hidden size {hidden} does not match config.text_hidden_size {config.text_hidden_size}"
            )
        d = config.cmt.hidden_size
        self.config = config
        self.text_encoder = text_encoder
        self.mm_encoder = CMT(config.cmt)
        self.text_projector = nn.Linear(config.text_hidden_size, d)
        self.obj_feat_projector = nn.Linear(config.feat_dim + config.img_feat_dim, d)
        self.obj_id_embedding = nn.Embedding(config.max_obj_num, d)
        self.out_head_attn = nn.Sequential(
            nn.Linear(d, d // 2), nn.ReLU(), nn.LayerNorm(d // 2, eps=1e-12), nn.Dropout(config.head_dropout),
            nn.Linear(d // 2, 1),
        )

    @property
    def num_objects(self) -> int:
        return self.config.max_obj_num

    def set_text_encoder_trainable(self, trainable: bool) -> None:
        for p in self.text_encoder.parameters():
            p.requires_grad_(bool(trainable))

    def check_inputs(self, obj_feats: torch.Tensor, obj_img_feats: torch.Tensor, locs: torch.Tensor,
                     batch: Optional[int] = None) -> None:
        """Refuse object inputs that do not have the (B, n_obj, dim) shapes of the config."""
        cfg = self.config
        n = cfg.max_obj_num
        for name, t, dim in (("obj_feats", obj_feats, cfg.feat_dim), ("obj_img_feats", obj_img_feats, cfg.img_feat_dim),
                             ("locs", locs, cfg.cmt.dim_loc)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[2] != dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected a tensor (B, {n}, {dim}), got {shape}")
            if t.shape[1] != n:
                raise ValueError(
                    f"{name}: {t.shape[1]} objects per scene, but this GAP network has {n} object slots "
                    f"(config.max_obj_num); pad or truncate the scene to {n} objects before calling it"
                )
            b = batch if batch is not None else obj_feats.shape[0]
            if t.shape[0] != b:
                raise ValueError(f"{name}: batch size {t.shape[0]}, expected {b}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, obj_feats: torch.Tensor,
                obj_img_feats: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
        """input_ids/attention_mask: (B, T) RoBERTa tokens of the prompts; obj_feats: (B, n_obj, feat_dim)
        3D features; obj_img_feats: (B, n_obj, img_feat_dim) 2D features; locs: (B, n_obj, 6) box centre
        + size. Returns logits (B, n_obj)."""
        self.check_inputs(obj_feats, obj_img_feats, locs, batch=input_ids.shape[0])
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text = self.text_projector(text)
        obj = self.obj_feat_projector(torch.cat([obj_feats, obj_img_feats], dim=-1)) + self.obj_id_embedding.weight
        obj = self.mm_encoder(text, attention_mask, obj, locs)
        return self.out_head_attn(obj).squeeze(-1)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], device: Union[str, torch.device, None] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa tokens of the raw prompts as the authors feed them (special tokens, right padding to the
    longest prompt, no truncation). Returns input_ids, attention_mask: (B, T) long."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
        raise ValueError("prompts: expected a non-empty list of strings")
    tok = tokenizer(list(prompts), return_tensors="pt", padding=True)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and tok["input_ids"].shape[1] > limit:
        raise ValueError(f"prompts: a prompt has {tok['input_ids'].shape[1]} tokens, the text encoder takes at most {limit}")
    return tok["input_ids"].to(device), tok["attention_mask"].to(device)


@torch.no_grad()
def gap_logits(model: GAPNet, tokenizer: Any, prompts: Sequence[str], obj_feats: torch.Tensor,
               obj_img_feats: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
    """GAP logits as the authors' inference computes them (eval mode, raw features, raw prompts).

    prompts: B task prompts in object-ID space (the annotation ``prompt``); obj_feats (B, n_obj, 1024)
    Uni3D; obj_img_feats (B, n_obj, 1024) DINOv2; locs (B, n_obj, 6) box centre + size, all unnormalised.
    Returns (B, n_obj) float32 logits on the inputs' device; softmax gives the predicted attention share.
    """
    if len(prompts) != obj_feats.shape[0]:
        raise ValueError(f"prompts: {len(prompts)} prompts for {obj_feats.shape[0]} scenes")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        ids, mask = encode_prompts(tokenizer, prompts, device)
        out = model(ids, mask, obj_feats.to(device, dtype), obj_img_feats.to(device, dtype), locs.to(device, dtype))
    finally:
        model.train(was_training)
    return out.float().to(obj_feats.device)


class GapScorer:
    """Online GAP for one sample, the ``scorer`` of ``shared.methods.fast3d.Fast3D``: called with the
    Chat-Scene host's ``gap_inputs`` — prompt (str), obj_feats (n_obj, 1024), obj_img_feats (n_obj, 1024),
    locs (n ≤ n_obj, 6; missing objects get zero boxes, ``pad_boxes``) — it returns (n_obj,) float32 logits
    (``gap_logits`` on a batch of one)."""

    def __init__(self, model: GAPNet, tokenizer: Any, count_flops: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: count each call's FLOPs (``torch.utils.flop_counter``; 2 per multiply-add) into ``last_flops``
        self.count_flops = bool(count_flops)
        self.last_flops: Optional[float] = None
        self._flops_by_length: Dict[int, float] = {}

    def __call__(self, prompt: str, obj_feats: torch.Tensor, obj_img_feats: torch.Tensor,
                 locs: torch.Tensor) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected the sample's raw prompt (str), got {type(prompt).__name__}")
        locs = pad_boxes(locs, obj_feats.shape[0])
        if not self.count_flops:
            return gap_logits(self.model, self.tokenizer, [prompt], obj_feats[None], obj_img_feats[None], locs[None])[0]
        # the FLOPs depend only on the prompt's token count: counted (FlopCounterMode, whose per-op dispatch
        # slows a forward down) on the first prompt of each length, then reused, so timings stay plain
        n_tok = len(self.tokenizer(prompt)["input_ids"])
        if n_tok not in self._flops_by_length:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                out = gap_logits(self.model, self.tokenizer, [prompt], obj_feats[None], obj_img_feats[None], locs[None])[0]
            self._flops_by_length[n_tok] = float(fc.get_total_flops())
        else:
            out = gap_logits(self.model, self.tokenizer, [prompt], obj_feats[None], obj_img_feats[None], locs[None])[0]
        self.last_flops = self._flops_by_length[n_tok]
        return out


def pad_boxes(locs: torch.Tensor, n_obj: int) -> torch.Tensor:
    """Chat-Scene's ``scene_locs`` hold one box per Mask3D instance (min(n, max_obj_num) rows) while its
    features are zero-padded to ``max_obj_num`` rows: give the missing objects zero boxes as well, the same
    treatment. locs: (n, 6) with n <= n_obj. Returns (n_obj, 6); more rows than objects are refused."""
    if locs.dim() != 2 or locs.shape[1] != 6:
        raise ValueError(f"locs: expected (n, 6) boxes (centre + size), got {tuple(locs.shape)}")
    n = locs.shape[0]
    if n > n_obj:
        raise ValueError(f"locs: {n} boxes for {n_obj} object slots")
    if n == n_obj:
        return locs
    return torch.cat([locs, locs.new_zeros(n_obj - n, 6)])


def _local_dir(param: str, path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{param}: {path!r} is not a local directory; give the folder holding RoBERTa's config.json, "
            f"vocab.json and merges.txt (weights are never downloaded)"
        )
    return path


def load_text_encoder(roberta_path: Union[str, os.PathLike], weights: bool = True) -> Tuple[nn.Module, Any]:
    """RoBERTa model + tokenizer from a local folder (``local_files_only``; the hub is never contacted).
    weights=False builds the model from its config only (for loading a full GAP checkpoint)."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    path = _local_dir("roberta_path", roberta_path)
    tokenizer = RobertaTokenizer.from_pretrained(path, local_files_only=True)
    if weights:
        model = RobertaModel.from_pretrained(path, local_files_only=True)
    else:
        model = RobertaModel(RobertaConfig.from_pretrained(path, local_files_only=True))
    return model, tokenizer


def build_gap(roberta_path: Union[str, os.PathLike], config: Optional[GAPConfig] = None) -> Tuple[GAPNet, Any]:
    """A fresh GAP network on pretrained RoBERTa weights (for training). Returns (model, tokenizer)."""
    encoder, tokenizer = load_text_encoder(roberta_path, weights=True)
    config = config or GAPConfig(text_hidden_size=encoder.config.hidden_size)
    return GAPNet(config, encoder), tokenizer


def checkpoint_state(obj: Any) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """(state_dict, gap_config dict or None) from a loaded checkpoint: the authors' format
    ``{"model_state_dict": ...}`` (this project adds ``"gap_config"``) or a bare state dict."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        return dict(obj["model_state_dict"]), obj.get("gap_config")
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    raise ValueError("checkpoint: expected a dict with 'model_state_dict' (the authors' format) or a bare state dict")


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)``, after a check that lists every missing, unexpected and
    shape-mismatched key in one error."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        def show(label: str, items: List[str]) -> str:
            if not items:
                return ""
            more = f" … (+{len(items) - 20} more)" if len(items) > 20 else ""
            return f"\n  {label} ({len(items)}): " + ", ".join(items[:20]) + more

        raise ValueError(
            f"{what}: does not match the GAP network (a different max_obj_num, hidden size or text encoder?)"
            + show("missing", missing) + show("unexpected", unexpected) + show("shape mismatch", shapes)
        )
    model.load_state_dict(state, strict=True)


def load_gap(checkpoint_path: Union[str, os.PathLike], roberta_path: Union[str, os.PathLike],
             config: Optional[GAPConfig] = None, device: Union[str, torch.device] = "cpu") -> Tuple[GAPNet, Any]:
    """A trained GAP network (eval mode) and its RoBERTa tokenizer.

    checkpoint_path: the authors' ``checkpoint_best.pth`` or this project's ``gap_best.pth``;
    roberta_path: local RoBERTa folder (config + tokenizer; its weights come from the checkpoint).
    config: sizes; default the checkpoint's ``gap_config`` if it has one, else the authors' defaults.
    Refuses any missing, unexpected or shape-mismatched key (listing them).
    """
    raw = torch.load(os.fspath(checkpoint_path), map_location="cpu", weights_only=True)
    state, saved = checkpoint_state(raw)
    encoder, tokenizer = load_text_encoder(roberta_path, weights=False)
    if config is None:
        config = GAPConfig.from_dict(saved) if saved is not None else GAPConfig(
            text_hidden_size=encoder.config.hidden_size)
    model = GAPNet(config, encoder)
    load_state_strict(model, state, what=f"checkpoint {os.fspath(checkpoint_path)!r}")
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------------------- cost
def authors_size_gap(n_obj: int = 100, seed: int = 0) -> GAPNet:
    """A random GAP network at the authors' size: ``GAPConfig()`` (4-layer spatial transformer, width 768)
    over a RoBERTa-base-sized ``RobertaModel(RobertaConfig())`` (~159 M parameters), in eval mode. For
    counting cost only; building it takes about a second on CPU."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    return GAPNet(GAPConfig(max_obj_num=n_obj), RobertaModel(RobertaConfig())).eval()


def gap_cost(model: GAPNet, text_tokens: int = 32, repeats: int = 3, seed: int = 1) -> Tuple[float, float]:
    """(FLOPs, best seconds of ``repeats``) of one forward of ``model`` on one random sample: a
    ``text_tokens``-token prompt and ``model.num_objects`` objects at the config's feature widths.

    FLOPs are ``torch.utils.flop_counter.FlopCounterMode``'s total (matmuls, attention; 2 per
    multiply-add). repeats=0 skips the timing (seconds = nan)."""
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise ValueError(f"text_tokens: expected a positive int, got {text_tokens!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats: expected an int >= 0, got {repeats!r}")
    cfg = model.config
    n = cfg.max_obj_num
    p = next(model.parameters())
    vocab = int(getattr(model.text_encoder.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        input_ids=torch.randint(min(5, vocab - 1), vocab, (1, text_tokens), generator=g),
        attention_mask=torch.ones(1, text_tokens, dtype=torch.long),
        obj_feats=torch.randn(1, n, cfg.feat_dim, generator=g),
        obj_img_feats=torch.randn(1, n, cfg.img_feat_dim, generator=g),
        locs=torch.rand(1, n, cfg.cmt.dim_loc, generator=g) * 4,
    )
    inputs = {k: v.to(p.device) if not v.is_floating_point() else v.to(p.device, p.dtype) for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                model(**inputs)
            best = float("nan")
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(**inputs)
                dt = time.perf_counter() - t0
                best = dt if best != best else min(best, dt)
    finally:
        model.train(was_training)
    return float(fc.get_total_flops()), best


# ------------------------------------------------------------------------------- training terms
def gap_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' distribution-matching loss KL(target ‖ softmax(logits)), ``batchmean``.

    logits: (B, n_obj); target: (B, n_obj) non-negative attention (unnormalised). Computed as
    ``kl_div(log(softmax(logits) + 1e-8), target / (Σ target + 1e-8), "batchmean")`` in float32.
    """
    import torch.nn.functional as F

    if logits.shape != target.shape or logits.dim() != 2:
        raise ValueError(f"target: expected the logits' shape (B, n_obj) {tuple(logits.shape)}, got {tuple(target.shape)}")
    t = target.float()
    t = t / (t.sum(-1, keepdim=True) + 1e-8)
    return F.kl_div(torch.log(torch.softmax(logits.float(), dim=-1) + 1e-8), t, reduction="batchmean")


def topk_set_f1(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample F1 between the top-k objects of ``logits`` and of ``target`` (the authors'
    validation metric; both sets have k members, so F1 = |overlap| / k). (B, n_obj) → (B,) float32."""
    n = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"topk: expected k in [1, {n}] (the number of objects), got {k!r}")
    pred = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
    true = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, target.topk(k, dim=-1).indices, True)
    return (pred & true).sum(-1).float() / k
