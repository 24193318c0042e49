"""AdaToken-3D calibration sums (``shared.methods.adatoken_calibration``) against the stock eager attention maps.

The reference takes ``output_attentions=True`` of the stock decoder, averages each layer's map over heads and sums
the blocks of notes §6.2–6.3 directly (rows = queries, columns = keys): SPA→SPA strictly below the diagonal,
PRM→SPA, SPA→SYS, then adds the samples of the batch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.methods.adatoken import SpanBlockSums, information_flow
from shared.methods.adatoken_calibration import accumulate, span_block_sums

from . import tiny

LENGTH = 30
# per sample: SYS, SPA, PRM; sample 1 is right-padded after 26 tokens and its spans differ
SYS = [[0, 4], [0, 3]]
SPA = [[4, 19], [3, 14]]
PRM = [[19, 30], [14, 26]]


def reference(model, embeds, mask):
    """(3, L) float64 [spa_spa, prm_spa, spa_sys] summed over the batch, from the eager attention maps."""
    with torch.no_grad():
        att = model.model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True).attentions
    out = np.zeros((3, len(att)))
    for i, a in enumerate(att):
        for b in range(embeds.shape[0]):
            m = a[b].double().mean(0)  # (n, n) head mean, rows = queries
            spa, prm, sys_ = slice(*SPA[b]), slice(*PRM[b]), slice(*SYS[b])
            out[0, i] += float(torch.tril(m[spa, spa], diagonal=-1).sum())
            out[1, i] += float(m[prm, spa].sum())
            out[2, i] += float(m[spa, sys_].sum())
    return out


def sample_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, LENGTH, 64, generator=g)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, 26:] = 0
    return embeds, mask


def _arrays(s):
    return np.stack([s.spa_spa, s.prm_spa, s.spa_sys])


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_matches_eager_attention_maps(chunk):
    model = tiny.build("llama", "eager", layers=3)
    embeds, mask = sample_batch()
    ref = reference(model, embeds, mask)
    got = span_block_sums(model.model, embeds, torch.tensor(SYS), torch.tensor(SPA), torch.tensor(PRM),
                          attention_mask=mask, chunk=chunk)
    assert got.num_layers == 3 and got.spa_rows == 15 + 11 and got.prm_rows == 11 + 12
    np.testing.assert_allclose(_arrays(got), ref, atol=1e-5, rtol=0)
    assert (ref > 0.05).all()  # every block carries attention: the comparison is not of zeros
    # self-attention (the diagonal) is excluded from SPA→SPA: with it the sum is larger by the diagonal mass
    assert not np.allclose(got.spa_spa, ref[0] + 1.0, atol=1e-2)
    information_flow(got)  # feeds Eq.1-4 as is


def test_batch_is_the_sum_of_single_prompts_and_sdpa_agrees():
    model = tiny.build("llama", "eager", layers=2)
    embeds, mask = sample_batch(1)
    both = span_block_sums(model.model, embeds, torch.tensor(SYS), torch.tensor(SPA), torch.tensor(PRM),
                           attention_mask=mask, chunk=4)
    singles = [span_block_sums(model.model, embeds[b:b + 1, :int(mask[b].sum())], tuple(SYS[b]), tuple(SPA[b]),
                               tuple(PRM[b]), chunk=5) for b in range(2)]
    total = accumulate(singles[0], singles[1])
    np.testing.assert_allclose(_arrays(total), _arrays(both), atol=1e-6, rtol=0)
    assert (total.spa_rows, total.prm_rows) == (both.spa_rows, both.prm_rows)
    if ("llama", "sdpa") in tiny.available():  # same weights, SDPA layers: nothing depends on attention maps
        sdpa = tiny.build("llama", "sdpa", layers=2)
        got = span_block_sums(sdpa.model, embeds, torch.tensor(SYS), torch.tensor(SPA), torch.tensor(PRM),
                              attention_mask=mask, chunk=64)
        np.testing.assert_allclose(_arrays(got), _arrays(both), atol=1e-5, rtol=0)


@pytest.mark.skipif(("qwen2", "eager") not in tiny.available(), reason="no Qwen2 in this transformers")
def test_qwen2_gqa_matches_eager():
    model = tiny.build("qwen2", "eager", layers=2)
    embeds, mask = sample_batch(2)
    got = span_block_sums(model.model, embeds, torch.tensor(SYS), torch.tensor(SPA), torch.tensor(PRM),
                          attention_mask=mask, chunk=7)
    np.testing.assert_allclose(_arrays(got), reference(model, embeds, mask), atol=1e-5, rtol=0)


def test_accumulate_by_hand_and_refusals():
    a = SpanBlockSums([1.0, 2.0], [0.5, 0.25], [3.0, 0.0], spa_rows=4, prm_rows=2)
    b = SpanBlockSums([0.5, 0.5], [0.0, 1.0], [1.0, 1.0], spa_rows=6, prm_rows=3)
    c = accumulate(a, b)
    assert c.spa_spa.tolist() == [1.5, 2.5] and c.prm_spa.tolist() == [0.5, 1.25] and c.spa_sys.tolist() == [4.0, 1.0]
    assert (c.spa_rows, c.prm_rows) == (10, 5)
    assert a.spa_spa.tolist() == [1.0, 2.0]  # inputs untouched
    with pytest.raises(ValueError, match="layers"):
        accumulate(a, SpanBlockSums([1.0], [1.0], [1.0], 1, 1))
    with pytest.raises(ValueError, match="b: expected a SpanBlockSums"):
        accumulate(a, {"spa_spa": [1.0, 2.0]})


def test_refuses_bad_spans():
    model = tiny.build("llama", "eager", layers=1)
    x = torch.randn(1, 20, 64)
    with pytest.raises(ValueError, match="spa_span: sample 0: expected SYS"):
        span_block_sums(model.model, x, (0, 5), (4, 12), (12, 20))  # SYS overlaps SPA
    with pytest.raises(ValueError, match="spa_span: sample 0: expected SYS"):
        span_block_sums(model.model, x, (0, 2), (10, 20), (2, 10))  # PRM before SPA: blocks above the diagonal
    with pytest.raises(ValueError, match="prm_span: sample 0: expected 0 <= start < end <= L = 20"):
        span_block_sums(model.model, x, (0, 2), (2, 12), (12, 21))
    with pytest.raises(ValueError, match="sys_span: expected a .start, end. pair"):
        span_block_sums(model.model, x, (0, 2, 3), (2, 12), (12, 20))
    with pytest.raises(ValueError, match="attention_mask: sample 0: padding inside prm_span"):
        mask = torch.ones(1, 20, dtype=torch.long)
        mask[0, 18:] = 0
        span_block_sums(model.model, x, (0, 2), (2, 12), (12, 20), attention_mask=mask)
    with pytest.raises(ValueError, match="chunk"):
        span_block_sums(model.model, x, (0, 2), (2, 12), (12, 20), chunk=0)
