"""The engine on native transformers 5.x LLaVA (the path the demo and later methods use)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("native LLaVA path is tested on transformers 5.x; the 4.x envs test the host decoders",
                allow_module_level=True)

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from shared import FastV, PyramidDrop  # noqa: E402
from shared.hosts import find_decoder, prune  # noqa: E402

IMG = 127


def _tiny():
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=56, patch_size=14, projection_dim=32)
    tc = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.randint(1, 120, (1, 5), generator=g), torch.full((1, 16), IMG),
                     torch.randint(1, 120, (1, 9), generator=g)], dim=1)
    return model, ids, torch.randn(1, 3, 56, 56, generator=g)


def test_visual_tokens_found_from_image_placeholders():
    model, ids, px = _tiny()
    with torch.no_grad(), prune(model, FastV(layer=2, keep=5)) as eng:
        model(input_ids=ids, pixel_values=px)
    assert eng.last_stats.visual[0].tolist() == [16, 16, 5, 5]
    assert eng.last_stats.tokens[0].tolist() == [30, 30, 19, 19]
    assert find_decoder(model) is model.model.language_model
    assert not model._forward_pre_hooks and "forward" not in find_decoder(model).__dict__


def test_nothing_pruned_equals_stock_llava_logits():
    model, ids, px = _tiny()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=px).logits
        with prune(model, FastV(layer=1, keep=16)):
            out = model(input_ids=ids, pixel_values=px).logits
    assert torch.equal(ref, out)


@pytest.mark.parametrize("method", [FastV(layer=1, keep=4), PyramidDrop(layers=(1, 3), ratio=0.5)])
def test_llava_generate_with_cache_equals_recompute(method):
    model, ids, px = _tiny()
    with torch.no_grad(), prune(model, method, query_index=torch.tensor([ids.shape[1] - 1])):
        gen = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
        seq = ids
        for t in range(5):
            logits = model(input_ids=seq, pixel_values=px, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            assert nxt == int(gen[0, ids.shape[1] + t]), f"step {t}"
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)


def test_prompt_without_image_placeholder_is_an_error():
    model, ids, px = _tiny()
    with prune(model, FastV(layer=1, keep=4)), pytest.raises(ValueError, match="^input_ids"):
        model(input_ids=torch.randint(1, 120, (1, 12)))


def test_demo_main_job_runs(capsys):
    from shared.demo import main

    assert main(["--repeats", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens per layer: [576, 144, 144" in out  # FastV K=1 R=25% on 8 layers
    assert "Fast3D" in out and "INCONSISTENT" in out
