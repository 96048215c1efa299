"""Model: parameter counts of the presets, shapes, loss masking, and KV-cached batched generation."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from raygpt.config import ModelConfig
from raygpt.errors import RaygptError
from raygpt.model import GPT, PRESETS, config_from_spec


def test_gpt2_small_parameter_counts():
    assert GPT(PRESETS["gpt2-small"]).num_params() == 163_009_536
    openai_layout = replace(PRESETS["gpt2-small"], qkv_bias=True, tie_weights=True)
    assert GPT(openai_layout).num_params() == 124_439_808


def test_config_from_spec_applies_overrides_and_rejects_unknown_preset():
    cfg = config_from_spec(ModelConfig(preset="tiny", context_length=32, qkv_bias=True))
    assert (cfg.n_layer, cfg.context_length, cfg.qkv_bias) == (2, 32, True)
    with pytest.raises(RaygptError, match="unknown preset 'gpt5'"):
        config_from_spec(ModelConfig(preset="gpt5"))


def test_tied_head_shares_the_embedding():
    model = GPT(replace(PRESETS["tiny"], tie_weights=True))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_forward_shapes_and_ignored_targets():
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"])
    idx = torch.randint(0, 50257, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50257)
    # A target of -100 contributes nothing: masking half the targets equals the loss on the rest.
    masked = idx.clone()
    masked[:, 8:] = -100
    _, partial = model(idx, masked)
    logits_first = logits[:, :8].reshape(-1, 50257)
    expected = torch.nn.functional.cross_entropy(logits_first, idx[:, :8].reshape(-1))
    torch.testing.assert_close(partial, expected)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50257.0)).item(), rel=0.05)


def test_context_length_is_enforced():
    model = GPT(PRESETS["tiny"])
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_flops_per_token_follows_6n_plus_attention():
    model = GPT(PRESETS["gpt2-small"])
    n = 163_009_536 - 1024 * 768 - 50257 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def _greedy_without_cache(model, prompt, n):
    x = torch.tensor([prompt])
    out = []
    for _ in range(n):
        logits, _ = model(x)
        token = logits[0, -1].argmax().item()
        out.append(token)
        x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return out


def test_batched_cached_generation_equals_one_by_one_without_cache():
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"]).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    batched = model.generate(prompts, max_new_tokens=12, eos_id=None)
    assert batched == [_greedy_without_cache(model, p, 12) for p in prompts]


def test_generation_stops_at_eos_and_samples_reproducibly():
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"]).eval()
    first = _greedy_without_cache(model, [5, 6], 3)
    # Declaring the 3rd greedy token the end token stops there and drops it.
    assert model.generate([[5, 6]], 10, eos_id=first[2]) == [first[:2]]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate([[5, 6]], 8, temperature=1.0, top_k=5, eos_id=None, generator=g1)
    b = model.generate([[5, 6]], 8, temperature=1.0, top_k=5, eos_id=None, generator=g2)
    assert a == b and len(a[0]) == 8


def test_model_imports_neither_the_tokenizer_nor_the_cluster_stack():
    code = "import sys, raygpt.model; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not loaded & {"raygpt.tokenizer", "tiktoken", "ray", "boto3", "rich", "raygpt.storage"}
