"""Sampling: the streamed KV-cache loop computes what ``GPT.generate`` computes, carries on past the
context, is reproducible from its seed without touching the global RNG; text streams whole
characters; ``raygpt sample`` and ``raygpt chat`` on tiny models."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.model import GPT, PRESETS
from raygpt.prompts import AlpacaPrompt
from raygpt.sample import TextStream, answer, chat, sample_text, stream_tokens
from raygpt.tokenizer import decode, encode
from raygpt.train.components import choose_precision
from raygpt.train.samples import training_samples
from raygpt.weights.checkpoint import save_model_dir


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(PRESETS["tiny"]).eval()


def test_greedy_stream_is_generate_token_for_token(tiny):
    prompt = encode("The quick brown fox")
    assert list(stream_tokens(tiny, prompt, 30, temperature=0.0, stop=None)) == \
        tiny.generate([prompt], max_new_tokens=30, temperature=0.0, eos_id=None)[0]


def test_a_sample_may_be_longer_than_the_context_and_the_seed_decides_it(tiny):
    prompt = encode("Once upon a time")
    state = torch.get_rng_state()
    first = list(stream_tokens(tiny, prompt, 150, 1.0, 50, torch.Generator().manual_seed(7), stop=None))
    again = list(stream_tokens(tiny, prompt, 150, 1.0, 50, torch.Generator().manual_seed(7), stop=None))
    other = list(stream_tokens(tiny, prompt, 150, 1.0, 50, torch.Generator().manual_seed(8), stop=None))
    assert len(first) == 150 > tiny.config.context_length  # the context (64) filled twice over
    assert first == again != other
    assert torch.equal(torch.get_rng_state(), state)  # only the sampling generator moved
    assert not tiny.training


def test_greedy_past_the_context_continues_from_its_last_half(tiny):
    prompt = encode("Once upon a time")
    out = list(stream_tokens(tiny, prompt, 70, temperature=0.0, stop=None))
    ctx = tiny.config.context_length
    tokens = prompt + out
    # Once the cache is full, the next token is the greedy continuation of the last half alone.
    # The cache holds ctx positions once the prompt and ctx - len(prompt) new tokens are in it;
    # the token after the next one is chosen from the last half alone.
    full_at = ctx - len(prompt) + 1
    window = tokens[:ctx + 1][-(ctx // 2):]
    assert out[full_at] == tiny.generate([window], 1, temperature=0.0, eos_id=None)[0][0]


def test_text_streams_whole_characters():
    text = "naïve café 😀 日本語 done"
    tokens = encode(text)
    stream = TextStream()
    pieces = [stream.add(t) for t in tokens] + [stream.close()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)  # no half character was ever shown
    assert any(p == "" for p in pieces)  # the emoji's bytes span tokens: held until whole


def test_sample_text_streams_what_it_returns(tiny):
    shown = []
    text = sample_text(tiny, "Hello", 20, 0.8, 50, torch.Generator().manual_seed(1), on_text=shown.append)
    assert "".join(shown) == text and text


def test_an_answer_stops_where_the_model_starts_a_new_section(monkeypatch, tiny):
    scripted = encode(" Paris is the capital.\n\n### Instruction:\nAnother question")
    monkeypatch.setattr("raygpt.sample.stream_tokens", lambda *args, **kwargs: (t for t in scripted))
    shown = []
    assert answer(tiny, AlpacaPrompt(), "Name the capital of France.", 50, on_text=shown.append) == \
        "Paris is the capital."
    assert "".join(shown) == " Paris is the capital."  # the stop sequence was never shown, even in part

    lines = iter(["Name the capital.", "", "Again.", "/exit", "never read"])
    written = []
    assert chat(tiny, AlpacaPrompt(), lambda: next(lines), written.append, 50) == 2
    assert "".join(written) == " Paris is the capital.\n" * 2


def test_training_samples_change_nothing_that_training_depends_on(tiny):
    spec = load_spec(None, ["log.sample_prompts=[The, 'def f(x):']", "log.sample_tokens=8", "train.seed=5"])
    worker = SimpleNamespace(spec=spec, device=torch.device("cpu"), model=tiny.train(),
                             state=SimpleNamespace(step=250), precision=choose_precision("fp32", torch.device("cpu")))
    state = torch.get_rng_state()
    samples = training_samples(worker)
    assert torch.equal(torch.get_rng_state(), state) and tiny.training  # train mode given back
    assert [s["prompt"] for s in samples] == ["The", "def f(x):"]
    assert samples == training_samples(worker)  # the same step shows the same samples
    worker.state.step = 500
    assert samples != training_samples(worker)
    tiny.eval()


# ---------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample") / "model"
    save_model_dir(tiny, tiny.config, folder)
    return folder


def test_sample_command_streams_reproducible_samples(model_dir, capsys):
    argv = ["sample", str(model_dir), "--prompt", "Once upon", "--max-new-tokens", "15", "--num-samples", "2",
            "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.count("Once upon") == 2 and "\n---------------\n" in out
    assert "3,243,776 params on cpu" in err and "seed 3" in err
    assert main(argv) == 0
    assert capsys.readouterr().out == out
    assert main(["sample", str(model_dir), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens: must be positive" in capsys.readouterr().err


def test_sample_output_is_what_the_streaming_loop_generates(model_dir, tiny, capsys):
    assert main(["sample", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    greedy = decode(list(stream_tokens(tiny, encode("Hi"), 12, temperature=0.0)))
    assert capsys.readouterr().out == "Hi" + greedy + "\n"


def test_chat_command_answers_a_fine_tuned_model_in_its_prompt_style(tiny, tmp_path, monkeypatch, capsys):
    ift = tmp_path / "ift"
    save_model_dir(tiny, tiny.config, ift / "mine" / "model")
    (ift / "mine" / "metrics.json").write_text(json.dumps({"config": {"prompt_style": "alpaca"}}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\nName a fruit.\n"))
    assert main(["chat", "ift:mine", "--set", f"ift.output={ift}", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "ift-mine: 3,243,776 params on cpu, alpaca prompt" in err
    expected = [answer(tiny, AlpacaPrompt(), q, 8) for q in ("Name a colour.", "Name a fruit.")]
    assert [line.strip() for line in out.splitlines()] == expected
    assert main(["chat", "ift:nobody", "--set", f"ift.output={ift}"]) == 2
    assert "ift:nobody: no fine-tuned model at" in capsys.readouterr().err
