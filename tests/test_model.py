"""Model: parameter counts of the presets, shapes, loss masking, KV-cached batched generation, the
chunked loss against plain cross-entropy (eager and compiled), and the padded vocabulary."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raygpt.config import ModelConfig, load_spec
from raygpt.errors import RaygptError
from raygpt.model import GPT, PRESETS, GPTConfig, chunked_cross_entropy, config_from_spec


def test_gpt2_small_parameter_counts():
    assert GPT(PRESETS["gpt2-small"]).num_params() == 163_009_536
    openai_layout = replace(PRESETS["gpt2-small"], qkv_bias=True, tie_weights=True)
    assert GPT(openai_layout).num_params() == 124_439_808


def test_config_from_spec_applies_overrides_and_the_spec_refuses_an_unknown_preset():
    cfg = config_from_spec(ModelConfig(preset="tiny", context_length=32, qkv_bias=True))
    assert (cfg.n_layer, cfg.context_length, cfg.qkv_bias) == (2, 32, True)
    with pytest.raises(RaygptError, match=r"model.preset: expected one of .*'gpt2-smal' .*did you mean 'gpt2-small'"):
        load_spec(None, ["model.preset=gpt2-smal"])


def test_a_new_run_pads_the_vocabulary_and_a_resumed_one_keeps_its_checkpoints_padding():
    unpadded, padded = replace(PRESETS["tiny"], vocab_multiple=1), replace(PRESETS["tiny"], vocab_multiple=64)
    assert config_from_spec(ModelConfig(preset="tiny")).padded_vocab_size == 50304
    assert config_from_spec(ModelConfig(preset="tiny"), trained=unpadded).padded_vocab_size == 50257
    assert config_from_spec(ModelConfig(preset="tiny"), trained=padded).padded_vocab_size == 50304
    # A number in the spec is the spec's, whatever the checkpoint holds (the shape check then speaks).
    assert config_from_spec(ModelConfig(preset="tiny", vocab_multiple=1), trained=padded).padded_vocab_size == 50257


def test_tied_head_shares_the_embedding():
    model = GPT(replace(PRESETS["tiny"], tie_weights=True))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_forward_shapes_and_ignored_targets():
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"])
    idx = torch.randint(0, 50257, (3, 16))
    logits, _ = model(idx)
    no_logits, loss = model(idx, idx)  # with targets only the loss: no (B, T, vocab) tensor is kept
    assert no_logits is None
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


# ---------------------------------------------------------------------------------------------
# The chunked loss and the padded vocabulary


# 36 rows: 7 does not divide them, 100 is one chunk. 512 rows: 500 tokens padded by the model;
# 500 rows: an unpadded head, which the loss pads to 512 itself (HEAD_ROW_ALIGNMENT).
@pytest.mark.parametrize("chunk_size,rows", [(1, 512), (7, 512), (12, 512), (36, 512), (100, 512), (7, 500),
                                             (100, 500)])
def test_chunked_cross_entropy_matches_full_logits_loss_and_grads(chunk_size, rows):
    torch.manual_seed(0)
    hidden = torch.randn(36, 16, requires_grad=True)
    weight = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, 500, (36,))
    targets[::4] = -100
    expected = F.cross_entropy((hidden @ weight.t())[:, :500], targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = chunked_cross_entropy(hidden, weight, targets, vocab_size=500, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert grads[1].shape == weight.shape
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    assert not grads[1][500:].any()  # the padding rows are never predicted, so never pushed
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, 500, chunk_size), expected.detach())


@pytest.mark.parametrize("rows", [500, 512])
def test_chunked_cross_entropy_under_bf16_autocast_matches_autocast_cross_entropy_eager_and_compiled(rows):
    """The loss casts the head and each chunk to autocast's dtype itself: the result is what
    autocast makes of the plain loss (bf16 matmul, float32 softmax), eager and compiled alike."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (0.3 * torch.randn(rows, 32)).requires_grad_()
    targets = torch.randint(0, 500, (40,))
    targets[::5] = -100

    def reference():
        return F.cross_entropy(F.linear(hidden, weight)[:, :500].float(), targets)

    def chunked():
        return chunked_cross_entropy(hidden, weight, targets, vocab_size=500, chunk_size=16)

    results = {}
    for name, loss_of in (("reference", reference), ("eager", chunked),
                          ("compiled", torch.compile(chunked, fullgraph=True))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of()
        results[name] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    for name in ("eager", "compiled"):
        for got, expected in zip(results[name], results["reference"]):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)  # bf16 operands: 8 bits of mantissa
    for got, expected in zip(results["compiled"], results["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_model_loss_and_grads_equal_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = GPT(replace(PRESETS["tiny"], vocab_multiple=64, tie_weights=True))
    idx = torch.randint(0, 50257, (2, 12))
    targets = idx.roll(-1, dims=1)
    targets[1, 5:] = -100
    logits, _ = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    _, loss = model(idx, targets)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(loss, list(model.parameters())), expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)


def test_compiled_model_matches_eager_loss_and_grads():
    torch.manual_seed(0)
    model = GPT(replace(PRESETS["tiny"], n_layer=1, vocab_multiple=64))
    idx = torch.randint(0, 50257, (2, 8))
    targets = idx.roll(-1, dims=1)
    targets[0, :3] = -100
    _, eager = model(idx, targets)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    _, compiled = torch.compile(model, fullgraph=True)(idx, targets)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    for grad, eager_grad in zip(torch.autograd.grad(compiled, list(model.parameters())), eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=0, atol=1e-5)


def test_padded_vocabulary_counts_and_exports_as_the_unpadded_model():
    with torch.device("meta"):  # no memory, no init: only shapes
        padded = GPT(replace(PRESETS["gpt2-small"], vocab_multiple=64))
        openai_padded = GPT(replace(PRESETS["gpt2-small"], qkv_bias=True, tie_weights=True, vocab_multiple=64))
    assert padded.lm_head.weight.shape == padded.transformer.wte.weight.shape == (50304, 768)
    assert padded.num_params() == 163_009_536
    assert openai_padded.num_params() == 124_439_808
    assert padded.flops_per_token(1024) == 6 * (163_009_536 - 1024 * 768 - 50257 * 768) + 12 * 12 * 768 * 1024
    # A saved config from before the field existed means no padding.
    assert GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32}).padded_vocab_size == 50257


@pytest.mark.parametrize("tie_weights", [False, True])
def test_padding_rows_are_never_predicted(tie_weights):
    torch.manual_seed(0)
    config = replace(PRESETS["tiny"], vocab_multiple=64, tie_weights=tie_weights)
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight[50257:] = 100.0  # logits these rows would win everywhere
    plain = GPT(replace(config, vocab_multiple=1)).eval()
    plain.load_state_dict(model.unpadded_state_dict())
    idx = torch.randint(0, 50257, (2, 10))
    logits, _ = model(idx)
    assert logits.shape == (2, 10, 50257)
    torch.testing.assert_close(logits, plain(idx)[0])
    torch.testing.assert_close(model(idx, idx)[1], plain(idx, idx)[1])
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    batched = model.generate(prompts, max_new_tokens=8, eos_id=None)
    assert batched == [_greedy_without_cache(model, p, 8) for p in prompts] == plain.generate(prompts, 8, eos_id=None)
    sampled = model.generate(prompts, 8, temperature=1.0, eos_id=None, generator=torch.Generator().manual_seed(0))
    assert max(max(s) for s in sampled) < 50257


def test_model_imports_neither_the_tokenizer_nor_the_cluster_stack():
    code = "import sys, raygpt.model; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not loaded & {"raygpt.tokenizer", "tiktoken", "ray", "boto3", "rich", "raygpt.storage"}


def test_models_built_with_one_seed_start_equal_in_every_parameter_they_share():
    """The paired design of a sweep: a QKV bias, tied weights or dropout change nothing in the
    initial values of the parameters the two models share; another seed changes all of them."""
    base = PRESETS["tiny"]
    baseline = dict(GPT(base, seed=7).named_parameters())
    for change in ({"qkv_bias": True}, {"tie_weights": True}, {"dropout": 0.3}):
        variant = GPT(replace(base, **change), seed=7)
        shared = {n: p for n, p in variant.named_parameters() if n in baseline}
        assert len(shared) >= len(baseline) - 1, change  # tying drops lm_head.weight
        for name, p in shared.items():
            assert torch.equal(p, baseline[name]), (change, name)
        plan, base_plan = variant.init_plan(), GPT(base, seed=7).init_plan()
        assert {n for n in plan if n in base_plan and plan[n] == base_plan[n]} == set(shared)
    other = dict(GPT(base, seed=8).named_parameters())
    drawn = [n for n, (_, rule) in GPT(base, seed=8).init_plan().items() if rule.startswith("normal")]
    assert drawn and not any(torch.equal(other[n], baseline[n]) for n in drawn)
    # Without a seed, torch's generator decides, as nanoGPT's GPT(config) does.
    torch.manual_seed(3)
    first = GPT(base).transformer.wte.weight.clone()
    torch.manual_seed(3)
    assert torch.equal(GPT(base).transformer.wte.weight, first)


def test_the_initialisation_keeps_gpt2s_statistics():
    model = GPT(PRESETS["nano"], seed=1)
    params = dict(model.named_parameters())
    assert abs(params["transformer.wte.weight"].std().item() - 0.02) < 1e-3
    assert abs(params["transformer.h.0.attn.c_proj.weight"].std().item() - 0.02 / math.sqrt(8)) < 1e-3
    assert torch.all(params["transformer.h.0.ln_1.weight"] == 1) and torch.all(params["transformer.h.0.ln_1.bias"] == 0)
