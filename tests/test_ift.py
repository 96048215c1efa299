"""Instruction fine-tuning: the book's prompt and split, masking, the loss falling, early stopping
that restores the best weights, batched answers, and ``raygpt ift`` end to end on Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from raygpt.config import IftConfig
from raygpt.errors import RaygptError
from raygpt.ift import (
    IGNORE_INDEX,
    InstructionDataset,
    collate_instructions,
    evaluate_loss,
    finetune,
    generate_answers,
    load_instruction_data,
    split_instruction_data,
)
from raygpt.model import GPT, GPTConfig
from raygpt.prompts import AlpacaPrompt, get_prompt_style
from raygpt.storage import Storage
from raygpt.tokenizer import EOT_ID, get_tokenizer

BOOK_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"
WORDS = "apple river stone cloud green quick silent bright paper window".split()
TINY = GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=96, tie_weights=True)


def make_instructions(n: int) -> list[dict[str, str]]:
    """``n`` examples of the book's shape: three simple tasks, a third of them without input."""
    entries = []
    for i in range(n):
        word = WORDS[(i * 7) % len(WORDS)]
        if i % 3 == 0:
            entries.append({"instruction": "Convert the word to uppercase.", "input": word, "output": word.upper()})
        elif i % 3 == 1:
            entries.append({"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]})
        else:
            entries.append({"instruction": f"Repeat the word {word} twice.", "input": "", "output": f"{word} {word}"})
    return entries


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


# --- prompts ---------------------------------------------------------------------------------


def test_alpaca_prompt_is_the_books_format_byte_for_byte():
    style = AlpacaPrompt()
    with_input = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "The cat was sitting."}
    without_input = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert style.format_training_text(with_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat.\n\n### Response:\nThe cat was sitting."
    )
    assert style.format_training_text(without_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\nBlue."
    )
    # The generation prompt is the training text up to the answer.
    assert style.format_prompt(without_input) == style.format_training_text(without_input)[:-len("Blue.")]
    assert style.format_input(without_input).endswith("### Instruction:\nName a color.")


def test_extract_response_strips_whitespace_and_a_repeated_header():
    style = get_prompt_style("alpaca")
    assert style.extract_response("  Blue.\n") == "Blue."
    assert style.extract_response("### Response:\nBlue.") == "Blue."
    assert (style.name, style.version) == ("alpaca", "1")
    with pytest.raises(RaygptError, match="unknown prompt style 'chatml'"):
        get_prompt_style("chatml")


# --- data ------------------------------------------------------------------------------------


def test_split_is_the_books_85_10_5_in_file_order():
    entries = make_instructions(1100)
    for i, entry in enumerate(entries):
        entry["output"] += f" #{i}"  # make every entry unique, to check order
    splits = split_instruction_data(entries)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (935, 55, 110)
    assert splits.train == entries[:935]
    assert splits.test == entries[935:1045]
    assert splits.val == entries[1045:]
    assert [len(s) for s in vars(split_instruction_data(entries[:10])).values()] == [8, 1, 1]
    with pytest.raises(RaygptError, match="leave the test split empty"):
        split_instruction_data(entries[:9])


def test_load_instruction_data_checks_the_shape_and_hashes_the_file(tmp_path):
    storage = Storage()
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_instructions(4)))
    entries, sha256 = load_instruction_data(str(good), storage)
    assert entries == make_instructions(4)
    assert sha256 == hashlib.sha256(good.read_bytes()).hexdigest()

    cases = {
        "[]": "non-empty JSON list",
        '[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "output": "b"}]':
            "entry 1 has no 'input'",
        '[{"instruction": "a", "input": "", "output": 3}]': "entry 0 key 'output' is a int",
        '["text"]': "entry 0 is a str",
        "{not json": "not valid JSON",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(RaygptError, match=message):
            load_instruction_data(str(bad), storage)
    with pytest.raises(RaygptError, match="not found"):
        load_instruction_data(str(tmp_path / "missing.json"), storage)


def test_unreachable_url_says_to_pass_a_local_path():
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RaygptError, match=r"cannot download .*--data PATH"):
        load_instruction_data(f"http://127.0.0.1:{port}/instruction-data.json", Storage())


def test_prompt_tokens_are_the_first_tokens_of_the_training_text():
    dataset = InstructionDataset(make_instructions(6), AlpacaPrompt())
    tokenizer = get_tokenizer()
    for entry, (ids, prompt_len) in zip(make_instructions(6), dataset.examples):
        assert ids[:prompt_len] == tokenizer.encode_ordinary(AlpacaPrompt().format_prompt(entry))
        assert tokenizer.decode(ids[prompt_len:]) == entry["output"]
        assert EOT_ID not in ids


# --- collate ---------------------------------------------------------------------------------


def test_collate_pads_with_end_tokens_and_masks_all_but_the_first():
    batch = [([11, 12, 13, 14], 2), ([21, 22], 1)]
    x, y = collate_instructions(batch)
    E, I = EOT_ID, IGNORE_INDEX
    assert x.tolist() == [[11, 12, 13, 14], [21, 22, E, E]]
    assert y.tolist() == [[12, 13, 14, E], [22, E, I, I]]


def test_collate_masks_the_prompt_and_truncates_to_the_context():
    batch = [([11, 12, 13, 14, 15], 3), ([21, 22, 23], 2)]
    x, y = collate_instructions(batch, mask_prompt=True)
    E, I = EOT_ID, IGNORE_INDEX
    # Prompt 11 12 13: targets 12 and 13 are prompt tokens; 14 (the first answer token) counts.
    assert y.tolist() == [[I, I, 14, 15, E], [I, 23, E, I, I]]
    assert x.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, E, E]]
    x, y = collate_instructions(batch, allowed_max_length=3)
    assert x.tolist() == [[11, 12, 13], [21, 22, 23]]
    assert y.tolist() == [[12, 13, 14], [22, 23, E]]


# --- fine-tuning -----------------------------------------------------------------------------


def test_finetuning_lowers_the_validation_loss():
    splits = split_instruction_data(make_instructions(60))
    cfg = IftConfig(lr=1e-2, epochs=1, batch_size=8, eval_interval=3, patience=0)
    model, history = finetune(tiny_gpt(), splits.train, splits.val, cfg)
    assert history["steps"] == 6 == history["planned_steps"]
    assert [v["step"] for v in history["val"]] == [0, 3, 6]
    assert [t["step"] for t in history["train"]] == [3, 6]
    initial = history["val"][0]["loss"]
    assert history["best_val_loss"] < initial - 2.0
    assert history["train"][-1]["loss"] < history["train"][0]["loss"]
    assert not history["stopped_early"]


def test_early_stopping_restores_the_best_weights_not_the_last():
    # The validation answers contradict the training ones: after the model learns the format,
    # learning "yes" makes "no" ever less likely, so the validation loss turns up and stays up.
    entries = make_instructions(40)
    train = [{**e, "output": "yes"} for e in entries[:32]]
    val = [{**e, "output": "no"} for e in entries[32:]]
    # (At this rate and initialisation the validation loss first falls, then turns up for good.)
    cfg = IftConfig(lr=0.01, epochs=3, batch_size=8, eval_interval=1, patience=2, mask_prompt=True)
    model, history = finetune(tiny_gpt(1), train, val, cfg)
    losses = [v["loss"] for v in history["val"]]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert history["stopped_early"] and history["restored_best"]
    assert history["best_step"] == history["val"][best]["step"] > 0
    assert history["steps"] == history["best_step"] + cfg.patience < history["planned_steps"]
    returned = evaluate_loss(model, InstructionDataset(val, AlpacaPrompt()), cfg, "cpu")
    assert returned == history["best_val_loss"]  # exactly: the very weights of the best step
    assert returned != history["last_val_loss"]


# --- generation ------------------------------------------------------------------------------


def test_answers_are_greedy_batched_and_keep_the_test_order():
    entries = make_instructions(5)
    model = tiny_gpt().eval()
    cfg = IftConfig(max_new_tokens=6, generation_batch_size=2)
    items = generate_answers(model, entries, cfg)
    assert [item["id"] for item in items] == [f"test-{i:04d}" for i in range(5)]
    tokenizer = get_tokenizer()
    for entry, item in zip(entries, items):
        assert {k: item[k] for k in ("instruction", "input", "output")} == entry
        alone = model.generate([tokenizer.encode_ordinary(AlpacaPrompt().format_prompt(entry))], 6)[0]
        assert item["response"] == tokenizer.decode(alone).strip()
        assert item["response_tokens"] == len(alone)
        assert item["hit_token_limit"] == (len(alone) == 6)


# --- the book's file, when present -----------------------------------------------------------


@pytest.mark.skipif(not BOOK_DATA.exists(), reason=f"{BOOK_DATA} not present")
def test_the_books_instruction_data_splits_and_formats_as_in_the_book():
    entries, sha256 = load_instruction_data(str(BOOK_DATA), Storage())
    splits = split_instruction_data(entries)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (935, 55, 110)
    assert splits.test[0] == entries[935]
    first = entries[0]
    assert AlpacaPrompt().format_training_text(first) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{first['instruction']}\n\n### Input:\n{first['input']}"
        f"\n\n### Response:\n{first['output']}"
    )
    dataset = InstructionDataset(entries, AlpacaPrompt())
    # Every example fits GPT-2's context with its end token, so none is cut in training.
    assert max(len(ids) for ids, _ in dataset.examples) + 1 <= 1024


# --- raygpt ift, end to end ------------------------------------------------------------------


def test_one_model_writes_answers_metrics_and_model_to_a_local_folder(tmp_path):
    from raygpt.config import RunSpec
    from raygpt.ift import finetune_one
    from raygpt.weights.checkpoint import save_model_dir

    save_model_dir(tiny_gpt(), TINY, tmp_path / "base")
    splits = split_instruction_data(make_instructions(30))
    spec = RunSpec()
    spec.ift = IftConfig(epochs=1, lr=0.01, eval_interval=2, max_new_tokens=4, generation_batch_size=2)
    dataset = {"source": "generated", "sha256": "0" * 64}
    output = tmp_path / "results" / "ift"
    summary = finetune_one(str(tmp_path / "base"), spec, Storage(), splits, dataset, str(output))
    assert summary["model"] == "base" and summary["steps"] == 3 and summary["answers"] == 3
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()) == [
        "answers/base.json", "base/metrics.json", "base/model/model.pt", "base/model/model_config.json"]
    answers = json.loads((output / "answers" / "base.json").read_text())
    assert {"model", "base_model", "generation", "dataset", "items"} <= set(answers)
    assert answers["dataset"] == {**dataset, "split": "test", "n": 3}
    assert set(answers["items"][0]) >= {"id", "instruction", "input", "output", "response"}


def test_seeds_fine_tune_replicates_that_differ_and_resume_each(tmp_path, capsys):
    from raygpt.config import RunSpec
    from raygpt.ift import _fingerprint, finetune_one
    from raygpt.weights.checkpoint import save_model_dir

    save_model_dir(tiny_gpt(), TINY, tmp_path / "base")
    splits = split_instruction_data(make_instructions(30))
    spec = RunSpec()
    spec.ift = IftConfig(epochs=1, lr=0.01, batch_size=4, eval_interval=2, max_new_tokens=4, generation_batch_size=2,
                         seeds=[1, 2])
    dataset = {"source": "generated", "sha256": "0" * 64}
    output = tmp_path / "ift"
    for seed in spec.ift.seeds:
        summary = finetune_one(str(tmp_path / "base"), spec, Storage(), splits, dataset, str(output), seed=seed)
        assert summary["model"] == f"base@seed{seed}" and summary["seed"] == seed and not summary["skipped"]
    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.json")) == [
        "answers/base@seed1.json", "answers/base@seed2.json", "base@seed1/metrics.json",
        "base@seed1/model/model_config.json", "base@seed2/metrics.json", "base@seed2/model/model_config.json"]
    answers = {seed: json.loads((output / "answers" / f"base@seed{seed}.json").read_text()) for seed in (1, 2)}
    metrics = {seed: json.loads((output / f"base@seed{seed}" / "metrics.json").read_text()) for seed in (1, 2)}
    for seed in (1, 2):
        assert (answers[seed]["seed"], answers[seed]["base_model"]) == (seed, str(tmp_path / "base"))
        assert answers[seed]["fine_tuning"]["seed"] == seed == metrics[seed]["config"]["seed"]
    # Another batch order: another training curve, another model.
    assert metrics[1]["history"]["train"] != metrics[2]["history"]["train"]
    assert answers[1]["fingerprint"] != answers[2]["fingerprint"]
    # Each replicate resumes by its own fingerprint; the list of seeds is not part of it.
    spec.ift.seeds = [1, 2, 3]
    again = finetune_one(str(tmp_path / "base"), spec, Storage(), splits, dataset, str(output), seed=2)
    assert again["skipped"] and again["model"] == "base@seed2"
    assert _fingerprint("r", {}, dataset, IftConfig()) == _fingerprint("r", {}, dataset, IftConfig(seeds=[5, 6]))
    assert "already done" in capsys.readouterr().out


@pytest.mark.integration
def test_ift_command_fine_tunes_two_models_in_parallel_on_ray(ray_local, s3_env, tmp_path, capsys):
    from raygpt.cli import main
    from raygpt.config import RunSpec
    from raygpt.storage import join
    from raygpt.weights.checkpoint import save_model_dir
    from raygpt.weights.refs import load_model

    storage = Storage()
    bases = []
    for seed, name in ((0, "base-a"), (1, "base-b")):
        save_model_dir(tiny_gpt(seed), TINY, tmp_path / name)
        bases.append(str(tmp_path / name))
    data = json.dumps(make_instructions(30)).encode()
    data_uri = "s3://raygpt-test/ift-e2e/instruction-data.json"
    storage.write_bytes(data_uri, data)
    output = "s3://raygpt-test/ift-e2e/out"
    argv = ["ift", "--data", data_uri, "--output", output, "--model", bases[0], "--model", bases[1],
            "--set", "ift.epochs=1", "--set", "ift.lr=0.01", "--set", "ift.batch_size=4",
            "--set", "ift.eval_interval=2", "--set", "ift.max_new_tokens=8", "--set", f"storage_path={tmp_path}"]
    assert main(argv) == 0

    splits = split_instruction_data(make_instructions(30))
    for name in ("base-a", "base-b"):
        answers = storage.read_json(join(output, "answers", f"{name}.json"))
        assert answers["model"] == name and answers["base_model"] == str(tmp_path / name)
        assert answers["generation"] | {"max_new_tokens": 8, "temperature": 0.0, "decoding": "greedy",
                                        "prompt_style": "alpaca"} == answers["generation"]
        assert answers["dataset"] | {"source": data_uri, "sha256": hashlib.sha256(data).hexdigest(),
                                     "split": "test", "n": 3} == answers["dataset"]
        assert [(i["id"], i["instruction"], i["input"], i["output"]) for i in answers["items"]] == [
            (f"test-{k:04d}", e["instruction"], e["input"], e["output"]) for k, e in enumerate(splits.test)]
        assert all(isinstance(i["response"], str) for i in answers["items"])

        metrics = storage.read_json(join(output, name, "metrics.json"))
        history = metrics["history"]
        assert history["steps"] == 6 and [v["step"] for v in history["val"]] == [0, 2, 4, 6]
        assert history["best_val_loss"] < history["val"][0]["loss"]
        # The saved model is the one with the best validation loss.
        tuned, info = load_model(join(output, name, "model"), RunSpec(), storage)
        val_loss = evaluate_loss(tuned, InstructionDataset(splits.val, AlpacaPrompt()), IftConfig(), "cpu")
        assert val_loss == pytest.approx(history["best_val_loss"], rel=1e-5)
    assert "Instruction fine-tuning" in capsys.readouterr().out

    # A second run finds both models complete and keeps their answers.
    before = storage.read_bytes(join(output, "answers", "base-a.json"))
    assert main(argv) == 0
    assert capsys.readouterr().out.count("(kept)") == 2
    assert storage.read_bytes(join(output, "answers", "base-a.json")) == before

    # A model that cannot be loaded fails with its name, and nothing is written for it.
    assert main(argv[:5] + ["--model", str(tmp_path / "missing")] + argv[9:]) == 2
    assert "missing" in capsys.readouterr().err
    assert not storage.exists(join(output, "answers", "missing.json"))
