"""Smoke-check one transformers test env built by scripts/setup_test_envs.sh.

Usage:
    PYTHONPATH=.venvs/tf-X .venvs/base/bin/python scripts/check_tf_env.py [EXPECTED_VERSION]

EXPECTED_VERSION defaults to X, taken from a ``tf-X`` entry of PYTHONPATH.
Checks that:
  * transformers is the expected version and is imported from the PYTHONPATH dir,
    while torch and numpy come from the base venv (not the target dir);
  * a tiny random LlamaModel (GQA: 4 heads, 2 kv heads) runs a CPU forward with eager
    and, where the version has it, sdpa attention; both agree, with a padded attention
    mask, and an incremental decode step through the cache matches the full forward;
  * the same for Qwen2Model on versions that have it (>= 4.37; required for 4.40.2 / 5.x);
  * LlamaForCausalLM.generate (greedy, KV cache, left-padded batch) gives the tokens of a
    plain greedy loop of full forwards;
  * on 5.x, LlavaForConditionalGeneration and LlavaOnevisionForConditionalGeneration import.
Exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import re
import sys


def _expected_version() -> str | None:
    if len(sys.argv) > 1:
        return sys.argv[1]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        m = re.search(r"tf-([0-9][0-9A-Za-z.+-]*)/?$", entry)
        if m:
            return m.group(1)
    return None


def _vtuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _under(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def main() -> int:
    expected = _expected_version()
    if expected is None:
        print("usage: PYTHONPATH=.venvs/tf-X python scripts/check_tf_env.py [X]", file=sys.stderr)
        return 2

    import numpy
    import torch
    import transformers

    tf_ver = transformers.__version__
    print(f"transformers {tf_ver} from {os.path.dirname(transformers.__file__)}")
    print(f"torch {torch.__version__} from {os.path.dirname(torch.__file__)}")
    print(f"numpy {numpy.__version__} from {os.path.dirname(numpy.__file__)}")
    assert tf_ver == expected, f"expected transformers {expected}, got {tf_ver}"
    # torch/numpy must be the base venv's (sys.prefix), never the target dir's.
    for mod in (torch, numpy):
        assert _under(mod.__file__, sys.prefix), f"{mod.__name__} not from base venv: {mod.__file__}"
    for entry in filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if _under(transformers.__file__, entry):
            break
    else:
        raise AssertionError(f"transformers not imported from PYTHONPATH: {transformers.__file__}")

    v = _vtuple(tf_ver)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    from transformers import LlamaConfig, LlamaModel

    _check_model("llama", LlamaConfig, LlamaModel, v)
    _check_generate(LlamaConfig, v)

    if v >= (4, 37):  # Qwen2 landed in 4.37
        from transformers import Qwen2Config, Qwen2Model

        _check_model("qwen2", Qwen2Config, Qwen2Model, v)
    elif expected in ("4.40.2",) or v >= (5,):
        raise AssertionError("Qwen2 expected but missing")

    if v >= (5,):
        from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration  # noqa: F401

        print("llava / llava-onevision: import ok")

    print(f"OK transformers {tf_ver}")
    return 0


def _impls(v: tuple) -> list[str]:
    # sdpa attention classes for Llama arrived in 4.36.
    return ["eager", "sdpa"] if v >= (4, 36) else ["eager"]


def _build(cfg_cls, model_cls, impl: str, v: tuple, state=None):
    kw = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
    )
    cfg = cfg_cls(**kw)
    if v >= (4, 36):
        cfg._attn_implementation = impl  # property setter in 4.36+ / 5.x
    model = model_cls(cfg).eval()
    if v >= (4, 36):
        got = model.config._attn_implementation
        assert got == impl, f"asked for {impl} attention, model uses {got}"
    if v < (4, 48) and v >= (4, 36):
        # 4.36-4.47 pick a per-implementation attention class at construction time.
        cls_name = type(model.layers[0].self_attn).__name__
        assert ("Sdpa" in cls_name) == (impl == "sdpa"), f"{impl}: attention class {cls_name}"
    if state is not None:
        model.load_state_dict(state)
    return model


def _check_model(name: str, cfg_cls, model_cls, v: tuple) -> None:
    import torch

    B, T = 2, 7
    ids = torch.randint(0, 100, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding on row 1
    valid = mask.bool()

    outs = {}
    state = None
    for impl in _impls(v):
        model = _build(cfg_cls, model_cls, impl, v, state)
        if state is None:
            state = model.state_dict()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert out.shape == (B, T, 64), out.shape
            assert torch.isfinite(out[valid]).all(), f"{name}/{impl}: non-finite output"
            # Incremental decode through the cache must match the full forward (no padding).
            full = model(input_ids=ids).last_hidden_state
            pre = model(input_ids=ids[:, :-1], use_cache=True)
            step = model(input_ids=ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True)
            err = (step.last_hidden_state[:, -1] - full[:, -1]).abs().max().item()
            assert err < 1e-4, f"{name}/{impl}: cached decode differs from full forward by {err}"
        outs[impl] = out
        print(f"{name}: {impl} forward ok (cache type {type(pre.past_key_values).__name__}, "
              f"decode err {err:.2e})")
    if "sdpa" in outs:
        diff = (outs["eager"][valid] - outs["sdpa"][valid]).abs().max().item()
        assert diff < 1e-4, f"{name}: eager vs sdpa differ by {diff}"
        print(f"{name}: eager == sdpa (max diff {diff:.2e})")


def _check_generate(cfg_cls, v: tuple) -> None:
    """Greedy LlamaForCausalLM.generate with the KV cache on a left-padded batch must give
    the tokens of a plain greedy loop of full forwards (no cache)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    n_new = 4
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, use_cache=True)
        ref, m = ids, mask
        for _ in range(n_new):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ref, attention_mask=m, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
            m = torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, ref), f"cached generate {got.tolist()} != greedy full-forward loop {ref.tolist()}"
    # NB: generate(use_cache=False) is NOT checked: on 4.39.x/4.40.x it is wrong upstream for
    # multi-token steps (cache_position is cut to its last entry, so the causal mask is wrong).
    print(f"llama: greedy generate ok (cached generate == full-forward greedy loop, {n_new} new tokens)")


if __name__ == "__main__":
    sys.exit(main())
