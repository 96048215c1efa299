"""Hugging Face GPT-2 import and export: raygpt computes exactly what transformers computes.

No download: the tests build randomly initialised ``transformers`` GPT-2 models (a tiny shape
and the real gpt2-small shape), save them the way the hub stores them, import them, and
compare logits, losses and greedy generations; then the reverse direction through
``export_hf`` and ``GPT2LMHeadModel.from_pretrained``. Every parameter is perturbed first, so
biases and LayerNorms are not the zeros and ones of a fresh init that would hide a bad mapping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raygpt.errors import RaygptError
from raygpt.model import GPT, PRESETS
from raygpt.tokenizer import EOT_ID
from raygpt.weights.hf import export_hf, load_hf_dir, load_openai

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max abs logit difference, float32 on CPU
TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add noise to every parameter (biases and LayerNorms included) so each mapping matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _hf_model(seed: int, **config) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return _perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)), seed)


def _logit_gap(ours: GPT, theirs, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens)[0] - theirs(tokens).logits).abs().max().item()


def _hf_greedy(theirs, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation, cut where raygpt stops: before the first end token."""
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=EOT_ID)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOT_ID)] if EOT_ID in new else new


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random transformers GPT-2, saved as ``save_pretrained`` writes it, under
    ``<root>/gpt2`` so that ``$RAYGPT_HF_DIR=<root>`` can stand it in for ``openai:gpt2``."""
    theirs = _hf_model(seed=1, **TINY)
    directory = tmp_path_factory.mktemp("hf-tiny") / "gpt2"
    theirs.save_pretrained(directory, safe_serialization=True)
    return theirs, directory


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    """A random transformers GPT-2 of gpt2-small's exact shape, saved under ``<root>/gpt2`` as
    ``$RAYGPT_HF_DIR`` expects it."""
    theirs = _hf_model(seed=2)
    root = tmp_path_factory.mktemp("hf-root")
    theirs.save_pretrained(root / "gpt2", safe_serialization=True)
    return theirs, root


def _edited_copy(source: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    """A copy of a Hugging Face folder with its tensors and/or config changed."""
    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    save_file(edit_tensors(tensors) if edit_tensors else tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(edit_config(config) if edit_config else config))
    return target


# ---------------------------------------------------------------------------------------------
# transformers -> raygpt


def test_tiny_import_matches_transformers_logits_and_loss(tiny_hf):
    theirs, directory = tiny_hf
    ours = load_hf_dir(directory).eval()
    assert ours.config.qkv_bias and ours.config.tie_weights
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    assert ours.num_params() == theirs.num_parameters()
    tokens = torch.randint(0, TINY["vocab_size"], (3, TINY["n_positions"]), generator=torch.Generator().manual_seed(0))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE
    with torch.no_grad():
        _, our_loss = ours(tokens[:, :-1], tokens[:, 1:].contiguous())
        their_loss = theirs(tokens, labels=tokens).loss  # transformers shifts the labels itself
    assert abs(our_loss.item() - their_loss.item()) < 1e-5


def test_gpt2_small_shape_loads_through_raygpt_hf_dir(small_hf, monkeypatch):
    theirs, root = small_hf
    monkeypatch.setenv("RAYGPT_HF_DIR", str(root))
    ours = load_openai("openai:gpt2").eval()
    assert ours.num_params() == 124_439_808  # OpenAI's GPT-2 small: qkv bias, tied head
    tokens = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE
    # Greedy decoding on the real shape: a few tokens, token for token.
    assert ours.generate([[464, 3290, 318]], 6, eos_id=EOT_ID) == [_hf_greedy(theirs, [464, 3290, 318], 6)]


def test_greedy_generation_matches_transformers_token_for_token(tiny_hf):
    theirs, directory = tiny_hf
    ours = load_hf_dir(directory)
    prompts = [[15496, 995, 11], [464], [40, 1842, 257, 3290, 318, 257]]
    # raygpt decodes the prompts as one left-padded batch; transformers each alone.
    assert ours.generate(prompts, max_new_tokens=20, eos_id=EOT_ID) == [_hf_greedy(theirs, p, 20) for p in prompts]


def test_openai_layout_without_prefix_and_with_mask_buffers_loads(tiny_hf, tmp_path):
    """OpenAI's own upload names tensors without ``transformer.`` and carries mask buffers."""
    theirs, directory = tiny_hf

    def openai_layout(tensors):
        renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        for i in range(TINY["n_layer"]):
            renamed[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
            renamed[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return renamed

    ours = load_hf_dir(_edited_copy(directory, tmp_path / "openai", edit_tensors=openai_layout)).eval()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE

    # A missing tensor is named the way such a file spells its tensors.
    without_ln_f = _edited_copy(directory, tmp_path / "broken", edit_tensors=lambda t: {
        k: v for k, v in openai_layout(t).items() if k != "ln_f.weight"})
    with pytest.raises(RaygptError, match=r"model\.safetensors: not a GPT-2 checkpoint .*\n  ln_f\.weight: missing"):
        load_hf_dir(without_ln_f)


def test_untied_transformers_model_imports_untied(tmp_path):
    theirs = _hf_model(seed=3, tie_word_embeddings=False, **TINY)
    theirs.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_dir(tmp_path).eval()
    assert not ours.config.tie_weights
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE


def test_half_precision_weights_are_converted_to_float32(tiny_hf, tmp_path):
    _, directory = tiny_hf
    half = _edited_copy(directory, tmp_path / "fp16", edit_tensors=lambda t: {k: v.half() for k, v in t.items()})
    ours = load_hf_dir(half)
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    expected = load_file(directory / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"].half().float()
    assert torch.equal(ours.transformer.h[0].mlp.c_fc.weight, expected.t())


# ---------------------------------------------------------------------------------------------
# raygpt -> transformers


@pytest.mark.parametrize("tie_weights", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, tie_weights, qkv_bias):
    torch.manual_seed(4)
    ours = _perturb(GPT(replace(PRESETS["tiny"], tie_weights=tie_weights, qkv_bias=qkv_bias)), seed=4)
    written = export_hf(ours, tmp_path / "export", provenance={"source": "unit-test", "step": 7})
    assert [Path(w).name for w in written][0] == "model.safetensors" and Path(written[-1]).name == "config.json"
    assert not list((tmp_path / "export").glob(".*tmp*"))

    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert theirs.config.tie_word_embeddings is tie_weights
    shared = theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    assert shared is tie_weights
    if not tie_weights:  # transformers must keep the exported head, not re-tie it to wte
        assert torch.equal(theirs.lm_head.weight, ours.lm_head.weight)
    tokens = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(5))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE
    assert ours.generate([[9, 8, 7]], 12) == [_hf_greedy(theirs, [9, 8, 7], 12)]

    # And back: the exported folder imports to the same function (zero qkv bias made explicit).
    back = load_hf_dir(tmp_path / "export").eval()
    assert back.config.tie_weights is tie_weights and back.config.qkv_bias
    with torch.no_grad():
        assert torch.equal(back(tokens)[0], ours(tokens)[0])


def test_export_metadata_config_and_tokenizer(tmp_path):
    ours = GPT(replace(PRESETS["tiny"], dropout=0.1))
    export_hf(ours, tmp_path, provenance={"source": "run-a", "step": 100})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n_positions"] == config["n_ctx"] == 64
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1
    assert (config["activation_function"], config["layer_norm_epsilon"]) == ("gelu_new", 1e-5)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata()["source"] == "run-a" and f.metadata()["step"] == "100"
        assert "lm_head.weight" in f.keys()  # untied by default in raygpt
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    from raygpt.tokenizer import encode

    text = "Exported models keep GPT-2's tokenizer.<|endoftext|>"
    assert tokenizer.encode(text) == encode(text)


def test_gpt2_small_shape_round_trips_through_export(small_hf, tmp_path):
    theirs, root = small_hf
    ours = load_hf_dir(root / "gpt2")
    export_hf(ours, tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    original = load_file(root / "gpt2" / "model.safetensors")
    assert exported.keys() == original.keys()  # tied: no lm_head.weight, like transformers' own save
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_export_command_publishes_openai_and_raygpt_checkpoints(tiny_hf, tmp_path, monkeypatch, capsys):
    """``raygpt export MODEL OUTDIR`` for an ``openai:`` ref and for a raygpt model folder."""
    from raygpt.cli import main
    from raygpt.weights.checkpoint import save_model_dir

    theirs, directory = tiny_hf
    monkeypatch.setenv("RAYGPT_HF_DIR", str(directory.parent))
    assert main(["export", "openai:gpt2", str(tmp_path / "openai")]) == 0
    assert "to " + str(tmp_path / "openai") in capsys.readouterr().out
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "openai").eval()
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, theirs(tokens).logits)

    torch.manual_seed(7)
    ours = _perturb(GPT(PRESETS["tiny"]), seed=7)
    save_model_dir(ours, ours.config, tmp_path / "finetuned")
    assert main(["export", str(tmp_path / "finetuned"), str(tmp_path / "published")]) == 0
    published = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "published").eval()
    assert _logit_gap(ours, published, tokens) < TOLERANCE

    assert main(["export", str(tmp_path / "nothing-here"), str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_test_loss_of_an_openai_ref_is_transformers_loss(tiny_hf, tmp_path, monkeypatch):
    """``raygpt eval``'s per-model scorer on ``openai:gpt2`` gives GPT-2's own loss on the same windows."""
    from raygpt.config import load_spec
    from raygpt.data.batches import eval_batches
    from raygpt.data.prepare import prepare
    from raygpt.evaluate import model_test_loss
    from raygpt.storage import Storage

    theirs, directory = tiny_hf
    monkeypatch.setenv("RAYGPT_HF_DIR", str(directory.parent))
    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path / "cache"))
    words = "the of and to in is was for on that with as by at from which have an be this are".split()
    generator = torch.Generator().manual_seed(9)
    (tmp_path / "docs").mkdir()
    for i in range(40):
        picks = torch.randint(0, len(words), (120,), generator=generator).tolist()
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(" ".join(words[j] for j in picks))
    spec = load_spec(None, [f"data.source={tmp_path / 'docs'}", f"data.output={tmp_path / 'data'}",
                            "data.heldout_permille=500", "data.val_tokens=200", "data.test_tokens=600",
                            "data.shard_tokens=4000", "data.num_proc=1", f"eval.dataset={tmp_path / 'data'}",
                            "eval.batch_size=4", f"storage_path={tmp_path / 'runs'}"])
    storage = Storage.from_config(spec.storage)
    prepare(spec, storage)

    result = model_test_loss("openai:gpt2", spec, storage, seq_len=32)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(spec.eval.dataset, storage, "test", 32, 4):
            logits = theirs(x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert result["model"] == "openai-gpt2" and result["tokens"] == count > 0
    assert abs(result["test_loss"] - total / count) < 1e-5


@pytest.mark.integration
def test_export_to_s3_uploads_a_loadable_folder(s3_env, tmp_path):
    from raygpt.storage import Storage

    storage = Storage()
    ours = _perturb(GPT(PRESETS["tiny"]), seed=8)
    uri = f"s3://{s3_env.bucket}/exports/tiny-hf"
    written = export_hf(ours, uri, storage=storage)
    assert written[-1] == uri + "/config.json"
    storage.download(uri, tmp_path / "downloaded")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "downloaded").eval()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(8))
    assert _logit_gap(ours, theirs, tokens) < TOLERANCE


# ---------------------------------------------------------------------------------------------
# Bad folders and names


def test_missing_tensor_is_named(tiny_hf, tmp_path):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_tensors=lambda t: {
        k: v for k, v in t.items() if k != "transformer.h.1.mlp.c_fc.weight"})
    with pytest.raises(RaygptError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight: missing \(expected shape \(32, 128\)\)"):
        load_hf_dir(broken)


def test_misshaped_tensor_is_named_with_both_shapes(tiny_hf, tmp_path):
    _, directory = tiny_hf
    # An un-transposed Conv1D matrix: the classic conversion bug.
    broken = _edited_copy(directory, tmp_path / "b", edit_tensors=lambda t: {
        **t, "transformer.h.0.attn.c_attn.weight": t["transformer.h.0.attn.c_attn.weight"].t().contiguous()})
    with pytest.raises(RaygptError, match=r"transformer\.h\.0\.attn\.c_attn\.weight: shape \(96, 32\), expected \(32, 96\)"):
        load_hf_dir(broken)


def test_unexpected_tensor_is_an_error(tiny_hf, tmp_path):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_tensors=lambda t: {
        **t, "transformer.h.2.ln_1.weight": torch.ones(32)})
    with pytest.raises(RaygptError, match=r"transformer\.h\.2\.ln_1\.weight: unexpected tensor"):
        load_hf_dir(broken)


def test_every_problem_is_reported_at_once(tiny_hf, tmp_path):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_tensors=lambda t: {
        **{k: v for k, v in t.items() if k != "transformer.ln_f.bias"}, "transformer.wpe.weight": torch.zeros(63, 32)})
    with pytest.raises(RaygptError) as error:
        load_hf_dir(broken)
    assert "transformer.ln_f.bias: missing" in str(error.value)
    assert "transformer.wpe.weight: shape (63, 32), expected (64, 32)" in str(error.value)


def test_differing_head_with_tied_config_is_refused(tiny_hf, tmp_path):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_tensors=lambda t: {
        **t, "lm_head.weight": torch.zeros_like(t["transformer.wte.weight"])})
    with pytest.raises(RaygptError, match="lm_head.weight differs from transformer.wte.weight.*tie_word_embeddings"):
        load_hf_dir(broken)


def test_untied_config_without_a_head_reports_it_missing(tiny_hf, tmp_path):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_config=lambda c: {**c, "tie_word_embeddings": False})
    with pytest.raises(RaygptError, match=r"lm_head\.weight: missing \(expected shape \(50257, 32\)\)"):
        load_hf_dir(broken)


@pytest.mark.parametrize("key, value, message", [
    ("activation_function", "relu", "activation_function: 'relu' unsupported"),
    ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon: 1e-06 unsupported"),
    ("n_inner", 100, "n_inner: 100 unsupported"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx: True unsupported"),
    ("model_type", "llama", "model_type: 'llama' is not gpt2"),
    ("n_head", 3, "n_embd: 32 is not divisible by n_head=3"),
    ("n_layer", None, "n_layer: expected a positive integer, got None"),
])
def test_unsupported_config_is_named(tiny_hf, tmp_path, key, value, message):
    _, directory = tiny_hf
    broken = _edited_copy(directory, tmp_path / "b", edit_config=lambda c: {**c, key: value})
    with pytest.raises(RaygptError, match="config.json: unsupported GPT-2 config") as error:
        load_hf_dir(broken)
    assert message in str(error.value)


def test_missing_files_and_folders(tiny_hf, tmp_path):
    _, directory = tiny_hf
    with pytest.raises(RaygptError, match="no such directory"):
        load_hf_dir(tmp_path / "nowhere")
    (tmp_path / "no-config").mkdir()
    with pytest.raises(RaygptError, match=r"config\.json: missing"):
        load_hf_dir(tmp_path / "no-config")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(RaygptError, match=r"model\.safetensors: missing"):
        load_hf_dir(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RaygptError, match="not a readable safetensors file"):
        load_hf_dir(tmp_path / "no-weights")


def test_unknown_openai_name_lists_the_known_ones():
    with pytest.raises(RaygptError, match="openai:gpt3: unknown OpenAI model .known: gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        load_openai("gpt3")


def test_unreachable_hub_is_one_error_that_says_how_to_work_offline(tmp_path):
    """Offline mode with an empty cache fails the same way everywhere, network or not."""
    env = {k: v for k, v in os.environ.items() if k != "RAYGPT_HF_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    code = ("from raygpt.errors import RaygptError\nfrom raygpt.weights.hf import load_openai\n"
            "try:\n    load_openai('gpt2-medium')\nexcept RaygptError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert message.startswith("openai:gpt2-medium: cannot download openai-community/gpt2-medium from the Hugging Face hub")
    assert "$RAYGPT_HF_DIR/gpt2-medium" in message and "\n" not in message


def test_hellaswag_of_an_openai_ref_scores_the_imported_model(tiny_hf, monkeypatch):
    """``raygpt eval --task hellaswag``'s per-model scorer on ``openai:gpt2`` (the tiny stand-in)."""
    from raygpt.config import load_spec
    from raygpt.evaluate import model_hellaswag
    from raygpt.hellaswag import Item, score_items
    from raygpt.storage import Storage

    _, directory = tiny_hf
    monkeypatch.setenv("RAYGPT_HF_DIR", str(directory.parent))
    items = [Item(ctx="The cat sat on the mat. Then it", endings=("slept.", "flew.", "sang a song.", "left."), label=0),
             Item(ctx="She opened the oven and", endings=("took out the bread.", "sang.", "left.", "ran."), label=0)]
    result = model_hellaswag("openai:gpt2", load_spec(None), Storage(), items)
    assert result["model"] == "openai-gpt2" and result["checkpoint"] is None and result["items"] == 2
    direct = score_items(load_hf_dir(directory), items, "cpu")
    assert {k: result[k] for k in direct} == direct
