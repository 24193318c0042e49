"""A test-only transcription of Fast3D's pruning forward (``wencan25/Fast3D`` @ 3c42c63,
``transformers/src/transformers/models/llama/modeling_llama.py``, their transformers-4.31 fork of FastV's fork):

- ``_make_causal_mask`` / ``_expand_mask`` / ``LlamaModel._prepare_decoder_attention_mask`` (L42-72, L602-624);
- ``LlamaRotaryEmbedding`` and ``apply_rotary_pos_emb`` (L91-123, L175-184), with the ``seq_len=1000`` call
  of ``LlamaAttention.forward`` (L319);
- ``LlamaAttention.forward`` (pretraining_tp = 1) and ``LlamaDecoderLayer.forward`` (L285-420), eager;
- ``LlamaModel.forward`` (L626-860): the non-checkpointing layer loop with the ``use_fast_v_oracle`` branch
  and the ``use_fast_v`` attention-mask branch (including its K = 0 ``random.shuffle`` branch). The in-place
  branch (``fast_v_inplace``, never enabled by Fast3D) is not transcribed.

The real fork cannot run here (it *is* a transformers 4.31 install), so this runs the same loop and mask logic
over the weights of a stock ``LlamaForCausalLM`` of whatever transformers is installed: its submodules
(``input_layernorm``, ``q/k/v/o_proj``, ``post_attention_layernorm``, ``mlp``, ``norm``) are called, the rest is
transcribed, so nothing here goes through the stock layer, the stock mask code or ``shared``. Chat-Scene's
Fast3D models load the LLM with ``output_attentions=True``, so every layer returns its weights (``layer_outputs[1]``
is the attention map the FastV branch reads). RoPE uses base 10000, as the fork (which predates
``rope_theta``) does.

``ReleasedFast3D`` is a decoder ``forward``: patch it onto ``model.model`` and call the model or ``generate``;
the KV cache is a legacy tuple, or a ``Cache`` object when ``generate`` passes one (transformers 5.x), updated
in place. ``oracle_a_map`` (their ``generate`` kwarg) is held on the object. ``selections`` records the
``top_attention_rank_index`` of every forward, sorted.
"""
from __future__ import annotations

import math
import random
from typing import Any, List, Optional

import torch
from torch import nn


def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length: int = 0):
    bsz, tgt_len = input_ids_shape
    mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
    mask_cond = torch.arange(mask.size(-1), device=device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    mask = mask.to(dtype)
    if past_key_values_length > 0:
        mask = torch.cat([torch.zeros(tgt_len, past_key_values_length, dtype=dtype, device=device), mask], dim=-1)
    return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len + past_key_values_length)


def _expand_mask(mask: torch.Tensor, dtype, tgt_len: Optional[int] = None):
    bsz, src_len = mask.size()
    tgt_len = tgt_len if tgt_len is not None else src_len
    expanded_mask = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)
    inverted_mask = 1.0 - expanded_mask
    return inverted_mask.masked_fill(inverted_mask.to(torch.bool), torch.finfo(dtype).min)


def _prepare_decoder_attention_mask(attention_mask, input_shape, inputs_embeds, past_key_values_length):
    combined_attention_mask = None
    if input_shape[-1] > 1:
        combined_attention_mask = _make_causal_mask(
            input_shape, inputs_embeds.dtype, device=inputs_embeds.device, past_key_values_length=past_key_values_length
        )
    if attention_mask is not None:
        expanded_attn_mask = _expand_mask(attention_mask, inputs_embeds.dtype, tgt_len=input_shape[-1]).to(
            inputs_embeds.device
        )
        combined_attention_mask = (
            expanded_attn_mask if combined_attention_mask is None else expanded_attn_mask + combined_attention_mask
        )
    return combined_attention_mask


class _Rotary:
    """``LlamaRotaryEmbedding`` of the fork (no scaling)."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float = 10000, device=None) -> None:
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float().to(device) / dim))
        self._set_cos_sin_cache(max_position_embeddings, self.inv_freq.device, torch.get_default_dtype())

    def _set_cos_sin_cache(self, seq_len, device, dtype):
        self.max_seq_len_cached = seq_len
        t = torch.arange(self.max_seq_len_cached, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cached = emb.cos()[None, None, :, :].to(dtype)
        self.sin_cached = emb.sin()[None, None, :, :].to(dtype)

    def __call__(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len=seq_len, device=x.device, dtype=x.dtype)
        return (
            self.cos_cached[:, :, :seq_len, ...].to(dtype=x.dtype),
            self.sin_cached[:, :, :seq_len, ...].to(dtype=x.dtype),
        )


def _rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    cos = cos.squeeze(1).squeeze(0)
    sin = sin.squeeze(1).squeeze(0)
    cos = cos[position_ids].unsqueeze(1)
    sin = sin[position_ids].unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _is_cache_object(past: Any) -> bool:
    return past is not None and not isinstance(past, (tuple, list)) and hasattr(past, "update")


def _attention(layer: nn.Module, cfg, rotary: _Rotary, layer_idx: int, hidden_states, attention_mask, position_ids,
               past_key_value, cache_object):
    """``LlamaAttention.forward`` of the fork; returns (output, weights, present)."""
    attn = layer.self_attn
    num_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // num_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    bsz, q_len, _ = hidden_states.size()
    query_states = attn.q_proj(hidden_states).view(bsz, q_len, num_heads, head_dim).transpose(1, 2)
    key_states = attn.k_proj(hidden_states).view(bsz, q_len, num_kv, head_dim).transpose(1, 2)
    value_states = attn.v_proj(hidden_states).view(bsz, q_len, num_kv, head_dim).transpose(1, 2)
    kv_seq_len = key_states.shape[-2]
    if past_key_value is not None:
        kv_seq_len += past_key_value[0].shape[-2]
    elif cache_object is not None:
        kv_seq_len += cache_object.get_seq_length(layer_idx)
    cos, sin = rotary(value_states, seq_len=1000)
    query_states, key_states = _apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
    if cache_object is not None:  # transformers >= 4.36 generate hands a Cache object: same concatenation
        key_states, value_states = cache_object.update(key_states, value_states, layer_idx)
        present = cache_object
    else:
        if past_key_value is not None:
            key_states = torch.cat([past_key_value[0], key_states], dim=2)
            value_states = torch.cat([past_key_value[1], value_states], dim=2)
        present = (key_states, value_states)
    key_states = _repeat_kv(key_states, num_heads // num_kv)
    value_states = _repeat_kv(value_states, num_heads // num_kv)
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    assert attn_weights.size() == (bsz, num_heads, q_len, kv_seq_len)
    if attention_mask is not None:
        assert attention_mask.size() == (bsz, 1, q_len, kv_seq_len)
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, cfg.hidden_size)
    return attn.o_proj(attn_output), attn_weights, present


def _decoder_layer(layer, cfg, rotary, layer_idx, hidden_states, attention_mask, position_ids, past_key_value,
                   cache_object):
    """``LlamaDecoderLayer.forward`` with output_attentions=True, use_cache=True: (hidden, weights, present)."""
    residual = hidden_states
    hidden_states = layer.input_layernorm(hidden_states)
    hidden_states, self_attn_weights, present_key_value = _attention(
        layer, cfg, rotary, layer_idx, hidden_states, attention_mask, position_ids, past_key_value, cache_object
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = layer.post_attention_layernorm(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states, self_attn_weights, present_key_value


class ReleasedFast3D:
    """Their ``LlamaModel.forward`` over ``model``'s weights, with the fork's FastV settings
    (``use_fast_v``, ``fast_v_sys_length``, ``fast_v_image_token_length``, ``fast_v_attention_rank``,
    ``fast_v_agg_layer``, ``use_fast_v_oracle``; ``fast_v_inplace`` = False) and ``oracle_a_map`` (B or 1, IMG).
    ``rng``: the ``random`` module or a ``random.Random`` for the K = 0 shuffle."""

    def __init__(self, model, *, use_fast_v: bool, fast_v_sys_length: int, fast_v_image_token_length: int,
                 fast_v_attention_rank: int, fast_v_agg_layer: int, use_fast_v_oracle: bool = False,
                 oracle_a_map: Optional[torch.Tensor] = None, rng: Any = random) -> None:
        self.model = model
        self.decoder = model.model
        cfg = model.config
        self.cfg = cfg
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        assert theta == 10000.0, "the fork's rotary embedding has base 10000"
        self.rotary = _Rotary(head_dim, cfg.max_position_embeddings)
        self.use_fast_v = use_fast_v
        self.fast_v_sys_length = fast_v_sys_length
        self.fast_v_image_token_length = fast_v_image_token_length
        self.fast_v_attention_rank = fast_v_attention_rank
        self.fast_v_agg_layer = fast_v_agg_layer
        self.use_fast_v_oracle = use_fast_v_oracle
        self.oracle_a_map = oracle_a_map
        self.rng = rng
        self.selections: List[torch.Tensor] = []

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                 return_dict=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        oracle_a_map = self.oracle_a_map
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both decoder_input_ids and decoder_inputs_embeds at the same time")
        elif input_ids is not None:
            batch_size, seq_length = input_ids.shape
        else:
            batch_size, seq_length, _ = inputs_embeds.shape
        cache_object = past_key_values if _is_cache_object(past_key_values) else None
        if cache_object is not None:
            past_key_values_length = cache_object.get_seq_length()
        else:
            past_key_values_length = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        seq_length_with_past = seq_length + past_key_values_length
        if position_ids is None:
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            position_ids = torch.arange(
                past_key_values_length, seq_length + past_key_values_length, dtype=torch.long, device=device
            )
            position_ids = position_ids.unsqueeze(0).view(-1, seq_length)
        else:
            position_ids = position_ids.view(-1, seq_length).long()
        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones((batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device)
        attention_mask = _prepare_decoder_attention_mask(
            attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
        )
        hidden_states = inputs_embeds
        all_self_attns = ()
        next_decoder_cache = ()
        SYS_LENGTH = self.fast_v_sys_length
        IMAGE_TOKEN_LENGTH = self.fast_v_image_token_length
        ATTENTION_RANK = self.fast_v_attention_rank
        AGG_LAYER = self.fast_v_agg_layer
        if AGG_LAYER:
            assert AGG_LAYER > 0, "K should be larger than 0"
        layer_outputs = None
        gen_attention_mask = None
        for idx, decoder_layer in enumerate(self.decoder.layers):
            past_key_value = past_key_values[idx] if cache_object is None and past_key_values is not None else None
            if self.use_fast_v_oracle:
                if idx < AGG_LAYER:
                    new_attention_mask = torch.ones(
                        (batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device
                    )
                    new_attention_mask = _prepare_decoder_attention_mask(
                        new_attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
                    )
                elif idx == AGG_LAYER:
                    top_attention_rank_index = oracle_a_map[0].topk(ATTENTION_RANK).indices + SYS_LENGTH
                    self.selections.append(top_attention_rank_index.sort().values.cpu())
                    gen_attention_mask = torch.ones(
                        (batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device
                    )
                    gen_attention_mask[:, SYS_LENGTH:SYS_LENGTH + IMAGE_TOKEN_LENGTH] = False
                    gen_attention_mask[:, top_attention_rank_index] = True
                    gen_attention_mask = _prepare_decoder_attention_mask(
                        gen_attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
                    )
                    new_attention_mask = gen_attention_mask
                else:
                    new_attention_mask = gen_attention_mask
            elif self.use_fast_v:
                if idx < AGG_LAYER:
                    new_attention_mask = torch.ones(
                        (batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device
                    )
                    new_attention_mask = _prepare_decoder_attention_mask(
                        new_attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
                    )
                elif idx == AGG_LAYER:
                    if idx != 0:
                        last_layer_attention = layer_outputs[1]
                        last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
                        last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
                        last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[
                            SYS_LENGTH:SYS_LENGTH + IMAGE_TOKEN_LENGTH
                        ]
                        top_attention_rank_index = (
                            last_layer_attention_avg_last_tok_image.topk(ATTENTION_RANK).indices + SYS_LENGTH
                        )
                        self.selections.append(top_attention_rank_index.sort().values.cpu())
                        gen_attention_mask = torch.ones(
                            (batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device
                        )
                        gen_attention_mask[:, SYS_LENGTH:SYS_LENGTH + IMAGE_TOKEN_LENGTH] = False
                        gen_attention_mask[:, top_attention_rank_index] = True
                        gen_attention_mask = _prepare_decoder_attention_mask(
                            gen_attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
                        )
                        new_attention_mask = gen_attention_mask
                    else:
                        gen_attention_mask = torch.ones(
                            (batch_size, seq_length_with_past), dtype=torch.bool, device=inputs_embeds.device
                        )
                        rand_image_attention_mask = [1] * ATTENTION_RANK + [0] * (IMAGE_TOKEN_LENGTH - ATTENTION_RANK)
                        self.rng.shuffle(rand_image_attention_mask)
                        self.selections.append(
                            torch.tensor([SYS_LENGTH + i for i, v in enumerate(rand_image_attention_mask) if v])
                        )
                        gen_attention_mask[:, SYS_LENGTH:SYS_LENGTH + IMAGE_TOKEN_LENGTH] = torch.tensor(
                            rand_image_attention_mask, dtype=attention_mask.dtype, device=inputs_embeds.device
                        )
                        gen_attention_mask = _prepare_decoder_attention_mask(
                            gen_attention_mask, (batch_size, seq_length), inputs_embeds, past_key_values_length
                        )
                        new_attention_mask = gen_attention_mask
                else:
                    new_attention_mask = gen_attention_mask
            else:
                new_attention_mask = attention_mask
            layer_outputs = _decoder_layer(
                decoder_layer, self.cfg, self.rotary, idx, hidden_states, new_attention_mask, position_ids,
                past_key_value, cache_object,
            )
            hidden_states = layer_outputs[0]
            next_decoder_cache += (layer_outputs[2],)
            all_self_attns += (layer_outputs[1],)
        hidden_states = self.decoder.norm(hidden_states)
        use_cache = True if use_cache is None else use_cache
        next_cache = (cache_object if cache_object is not None else next_decoder_cache) if use_cache else None
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=next_cache,
            attentions=all_self_attns if output_attentions else None,
        )
