"""Instruction fine-tuning (``raygpt ift``): the book's chapter 7 recipe, several base models at once.

For each base model, in its own Ray task (a GPU each when the cluster has GPUs):

1. the instruction data (the book's ``instruction-data.json`` or any file of its shape) split as
   the book splits it, in file order: 85% train, 10% test, the rest validation;
2. fine-tuning with AdamW on batches padded with ``<|endoftext|>``, targets masked past the
   first end token (and optionally over the prompt), validation loss every ``eval_interval``
   steps, early stopping, and the weights with the lowest validation loss restored from a copy;
3. greedy answers to the test instructions, batched, up to 256 new tokens each;
4. ``answers/<model>.json`` (what the judge reads), ``<model>/metrics.json`` (loss history,
   best step) and the fine-tuned model in ``<model>/model/``, under ``ift.output``.

With ``ift.seeds`` each base model is fine-tuned once per seed, a task each, as replicates
named ``<model>@seed<k>`` (``answers/<model>@seed<k>.json`` with ``base_model`` and ``seed``,
``<model>@seed<k>/...``): the judge pools them and puts the seed-to-seed variance in the
interval of the base model's score.

The answers file is written last: a model with an answers file is complete, and a re-run skips
it unless its base checkpoint, the data or the settings changed (``--force`` redoes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from raygpt.config import IftConfig, RunSpec, recorded_spec
from raygpt.errors import RaygptError
from raygpt.evaluate import token_loss_sums
from raygpt.logs import show_messages
from raygpt.prompts import PromptStyle, get_prompt_style
from raygpt.stages import ANSWERS_FOLDER, ift_dir, replicate_id
from raygpt.storage import Storage, is_remote, join, without_userinfo
from raygpt.storage.download import default_cache_dir, is_url, read_input
from raygpt.tokenizer import ENDOFTEXT, EOT_ID, get_tokenizer
from raygpt.train.components import Precision, choose_precision
from raygpt.train.metrics import MetricsStream
from raygpt.train.sinks import prepare_trackers, tracker_sinks

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target value that ``GPT.forward``'s cross-entropy skips."""


TRAIN_FRACTION, TEST_FRACTION = 0.85, 0.10
"""The book's split; validation gets what is left (935 / 110 / 55 of its 1100 examples)."""


Log = Callable[[str], None]


def load_instruction_data(source: str, storage: Storage) -> tuple[list[dict[str, str]], str]:
    """The examples of an instruction file (a URL, downloaded once into ``$RAYGPT_CACHE_DIR/ift``;
    a local path or an ``s3://`` URI) and its sha256.

    The file is a JSON list of objects whose ``instruction``, ``input`` and ``output`` are
    strings (``input`` may be empty); other keys are kept. The first bad entry is named.
    """
    raw, _ = read_input(source, storage, default_cache_dir("ift"), "the instruction data",
                        "pass a local copy with --data PATH (or ift.data=PATH)")
    shown = without_userinfo(source)
    try:
        entries = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RaygptError(f"{shown}: not valid JSON ({e})") from None
    check_instruction_data(entries, shown)
    return entries, hashlib.sha256(raw).hexdigest()


def check_instruction_data(entries: Any, source: str) -> None:
    """Raise unless ``entries`` is a non-empty list of instruction/input/output string objects."""
    if not isinstance(entries, list) or not entries:
        raise RaygptError(f"{source}: expected a non-empty JSON list of instruction/input/output objects")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise RaygptError(f"{source}: entry {index} is a {type(entry).__name__}, not an object")
        for key in ("instruction", "input", "output"):
            if key not in entry:
                raise RaygptError(f"{source}: entry {index} has no {key!r} (use \"\" for an empty input)")
            if not isinstance(entry[key], str):
                raise RaygptError(f"{source}: entry {index} key {key!r} is a {type(entry[key]).__name__}, "
                                  "not a string")


@dataclass
class InstructionSplits:
    train: list[dict[str, str]]
    val: list[dict[str, str]]
    test: list[dict[str, str]]


def split_instruction_data(entries: Sequence[dict[str, str]]) -> InstructionSplits:
    """The book's split, in file order (no shuffle), so results compare with the book's."""
    train_end = int(len(entries) * TRAIN_FRACTION)
    test_end = train_end + int(len(entries) * TEST_FRACTION)
    splits = InstructionSplits(train=list(entries[:train_end]), test=list(entries[train_end:test_end]),
                               val=list(entries[test_end:]))
    for name in ("train", "val", "test"):
        if not getattr(splits, name):
            raise RaygptError(f"instruction data: {len(entries)} examples leave the {name} split empty "
                              "(the 85/10/5 split needs at least 10)")
    return splits


class InstructionDataset(torch.utils.data.Dataset):
    """Examples tokenized once as ``(token ids of prompt + answer, number of prompt tokens)``.

    Text is tokenized as plain text: an ``<|endoftext|>`` written inside an example is not the
    end token, so data cannot end a sequence early.
    """

    def __init__(self, entries: Sequence[dict[str, str]], prompt_style: PromptStyle):
        tokenizer = get_tokenizer()
        self.examples: list[tuple[list[int], int]] = []
        for entry in entries:
            # GPT-2's pre-tokenizer splits at the newline that ends the response header, so the
            # prompt's tokens are exactly the first tokens of the training text.
            prompt_ids = tokenizer.encode_ordinary(prompt_style.format_prompt(entry))
            text_ids = tokenizer.encode_ordinary(prompt_style.format_training_text(entry))
            self.examples.append((text_ids, len(prompt_ids)))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.examples[index]


def collate_instructions(batch: Sequence[tuple[list[int], int]], pad_id: int = EOT_ID,
                         ignore_index: int = IGNORE_INDEX, allowed_max_length: int | None = None,
                         mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T) as the book's ``custom_collate_fn`` makes them.

    Each sequence gets one ``<|endoftext|>`` and is padded with more of them to the longest in
    the batch; targets are the inputs shifted by one, with every padding target after the first
    end token set to ``ignore_index`` (the model learns to stop, not to pad). ``mask_prompt``
    also ignores the targets inside the prompt, so only the answer and its end token count.
    Sequences are cut to ``allowed_max_length``.
    """
    padded_length = max(len(ids) for ids, _ in batch) + 1  # the longest sequence and its end token
    inputs, targets = [], []
    for ids, prompt_len in batch:
        padded = ids + [pad_id] * (padded_length - len(ids))
        x = torch.tensor(padded[:-1])
        y = torch.tensor(padded[1:])
        y[len(ids):] = ignore_index  # y[len(ids) - 1] is the end token it must learn to emit
        if mask_prompt:
            y[:prompt_len - 1] = ignore_index  # y[i] is token i + 1: the prompt is ids[:prompt_len]
        inputs.append(x[:allowed_max_length])
        targets.append(y[:allowed_max_length])
    return torch.stack(inputs), torch.stack(targets)


def evaluate_loss(model, dataset: InstructionDataset, cfg: IftConfig, device: str | torch.device,
                  precision: Precision | None = None) -> float:
    """Mean cross-entropy per target token over the whole dataset (not a mean of batch means)."""
    batches = (collate_instructions([dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))],
                                    allowed_max_length=model.config.context_length, mask_prompt=cfg.mask_prompt)
               for start in range(0, len(dataset), cfg.batch_size))
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    total, count = token_loss_sums(model, batches, device, autocast)
    return total / max(count, 1)


def finetune(model, train: Sequence[dict[str, str]], val: Sequence[dict[str, str]], cfg: IftConfig,
             device: str | torch.device = "cpu", log: Log | None = None,
             on_metrics: Callable[[dict[str, Any]], Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Fine-tune ``model`` on instruction examples; return it with the best weights, and the history.

    AdamW (no decay on biases and LayerNorms) at a constant ``cfg.lr``, ``cfg.batch_size``
    examples per step in a seeded order, full batches only (as the book). The validation loss
    is computed before the first step, every ``cfg.eval_interval`` steps and after the last;
    training stops after ``cfg.patience`` validations without a new best. The best weights are
    kept as a copy, not as ``state_dict()`` (whose tensors are the live parameters), and loaded
    back at the end. ``on_metrics`` gets each validation's losses as a metrics-stream report
    (``step``, ``loss``, ``val_loss``, ``epoch``, ``tokens``): the experiment trackers.
    """
    log = log or (lambda message: None)
    on_metrics = on_metrics or (lambda report: None)
    style = get_prompt_style(cfg.prompt_style)
    train_set, val_set = InstructionDataset(train, style), InstructionDataset(val, style)
    device = torch.device(device)
    precision = choose_precision(cfg.precision, device, key="ift.precision", allow_fp16=False)
    model.to(device)
    torch.manual_seed(cfg.seed)  # dropout
    order_rng = torch.Generator().manual_seed(cfg.seed)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, betas=(0.9, 0.999), device_type=device.type)
    steps_per_epoch = max(len(train_set) // cfg.batch_size, 1)
    planned_steps = steps_per_epoch * cfg.epochs
    context = model.config.context_length

    history: dict[str, Any] = {"train_examples": len(train_set), "val_examples": len(val_set),
                               "steps_per_epoch": steps_per_epoch, "planned_steps": planned_steps,
                               "train": [], "val": []}
    best_loss = evaluate_loss(model, val_set, cfg, device, precision)
    best_step, best_state = 0, _copy_state(model)
    history["val"].append({"step": 0, "epoch": 0.0, "loss": best_loss})
    log(f"step 0/{planned_steps}: val loss {best_loss:.4f}")
    on_metrics({"step": 0, "val_loss": best_loss, "epoch": 0.0, "tokens": 0})
    step, tokens, window = 0, 0, []
    evals_since_best, stopped_early = 0, False
    started = time.perf_counter()
    model.train()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(train_set), generator=order_rng).tolist()
        for first in range(0, steps_per_epoch * cfg.batch_size, cfg.batch_size):
            batch = [train_set[i] for i in order[first:first + cfg.batch_size]]
            x, y = collate_instructions(batch, allowed_max_length=context, mask_prompt=cfg.mask_prompt)
            tokens += int((y != IGNORE_INDEX).sum())  # counted on the CPU copy: no device sync
            x, y = x.to(device), y.to(device)
            with precision.autocast():
                _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            window.append(loss.detach())  # read at the next validation, not synced every step
            if step % cfg.eval_interval and step != planned_steps:
                continue
            epoch = step / steps_per_epoch
            window_loss = sum(value.item() for value in window) / len(window)
            history["train"].append({"step": step, "epoch": epoch, "loss": window_loss, "tokens": tokens})
            window = []
            val_loss = evaluate_loss(model, val_set, cfg, device, precision)
            history["val"].append({"step": step, "epoch": epoch, "loss": val_loss})
            on_metrics({"step": step, "loss": window_loss, "val_loss": val_loss, "epoch": epoch, "tokens": tokens})
            improved = val_loss < best_loss
            if improved:
                best_loss, best_step, best_state = val_loss, step, _copy_state(model)
                evals_since_best = 0
            else:
                evals_since_best += 1
            log(f"step {step}/{planned_steps} epoch {epoch:.2f}: train loss {history['train'][-1]['loss']:.4f}, "
                f"val loss {val_loss:.4f}{' (best)' if improved else ''}")
            if cfg.patience and evals_since_best >= cfg.patience:
                stopped_early = True
                log(f"early stop: {evals_since_best} validations without improvement")
                break
        if stopped_early:
            break
    last_loss = history["val"][-1]["loss"]
    if best_step != step:
        model.load_state_dict(best_state)
        log(f"restored the weights of step {best_step} (val loss {best_loss:.4f})")
    model.eval()
    history.update(steps=step, tokens=tokens, best_step=best_step, best_val_loss=best_loss,
                   last_val_loss=last_loss, stopped_early=stopped_early, restored_best=best_step != step,
                   seconds=time.perf_counter() - started)
    return model, history


def _copy_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def generate_answers(model, entries: Sequence[dict[str, str]], cfg: IftConfig,
                     log: Log | None = None) -> list[dict[str, Any]]:
    """Greedy answers to ``entries``, generated in batches of prompts of similar length.

    An answer ends at ``<|endoftext|>`` or after ``cfg.max_new_tokens`` tokens; a model whose
    context cannot hold both the prompt and that many tokens gets what its context leaves (at
    least a quarter of it, the prompt losing its start). Items keep the order of ``entries``.
    """
    log = log or (lambda message: None)
    style = get_prompt_style(cfg.prompt_style)
    tokenizer = get_tokenizer()
    device = model.lm_head.weight.device
    precision = choose_precision(cfg.precision, device, key="ift.precision", allow_fp16=False)
    context = model.config.context_length
    prompts = [tokenizer.encode_ordinary(style.format_prompt(entry)) for entry in entries]
    by_length = sorted(range(len(entries)), key=lambda i: len(prompts[i]))
    items: list[dict[str, Any]] = [{} for _ in entries]
    for first in range(0, len(by_length), cfg.generation_batch_size):
        chunk = by_length[first:first + cfg.generation_batch_size]
        longest = max(len(prompts[i]) for i in chunk)
        budget = min(cfg.max_new_tokens, max(context - longest, context // 4))
        with precision.autocast():
            outputs = model.generate([prompts[i] for i in chunk], max_new_tokens=budget, temperature=0.0,
                                     eos_id=EOT_ID)
        for i, new_tokens in zip(chunk, outputs):
            entry = entries[i]
            items[i] = {"id": f"test-{i:04d}", "instruction": entry["instruction"], "input": entry["input"],
                        "output": entry["output"],
                        "response": style.extract_response(tokenizer.decode(new_tokens)),
                        "response_tokens": len(new_tokens), "hit_token_limit": len(new_tokens) >= budget}
        log(f"answered {min(first + len(chunk), len(entries))}/{len(entries)}")
    return items


def generation_settings(cfg: IftConfig) -> dict[str, Any]:
    style = get_prompt_style(cfg.prompt_style)
    return {"decoding": "greedy", "max_new_tokens": cfg.max_new_tokens, "temperature": 0.0, "top_k": None,
            "stop": ENDOFTEXT, "prompt_style": style.name, "prompt_version": style.version,
            "batch_size": cfg.generation_batch_size, "precision": cfg.precision}


@dataclass
class IftLayout:
    """Where one model's results go under the ift output folder."""

    output: str
    model: str

    @property
    def answers(self) -> str:
        return join(self.output, ANSWERS_FOLDER, f"{self.model}.json")

    @property
    def metrics(self) -> str:
        return join(self.output, self.model, "metrics.json")

    @property
    def model_dir(self) -> str:
        return join(self.output, self.model, "model")


def finetune_one(ref: str, spec: RunSpec, storage: Storage, splits: InstructionSplits,
                 dataset: dict[str, Any], output: str, force: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Load ``ref``, fine-tune it, answer the test split and write its results; return a summary.

    ``seed``: one replicate of ``ift.seeds``, fine-tuned with that seed in place of ``ift.seed``
    and written as ``<model>@seed<seed>``; None: the one run of ``ift.seed``, as ``<model>``.
    """
    from raygpt.weights.checkpoint import save_model_dir
    from raygpt.weights.refs import load_model, model_id

    show_messages()
    cfg = spec.ift if seed is None else spec.ift.model_copy(update={"seed": seed})
    name = replicate_id(model_id(ref), seed)
    layout = IftLayout(output, name)

    def log(message: str) -> None:
        print(f"[ift {name}] {message}", flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_model(ref, spec, storage, device)
    base = {key: info.get(key) for key in ("id", "ref", "params", "step", "tokens")}
    fingerprint = _fingerprint(ref, base, dataset, cfg)
    if not force and storage.exists(layout.answers) and storage.exists(layout.metrics):
        previous = storage.read_json(layout.metrics)
        if previous.get("fingerprint") == fingerprint:
            log(f"already done (same base checkpoint, data and settings): {layout.answers}")
            return {**previous["summary"], "skipped": True}
    log(f"{base['params'] or model.num_params():,} parameters on {device}; fine-tuning on "
        f"{len(splits.train)} examples, validating on {len(splits.val)}")
    trackers = prepare_trackers(spec.log, f"{spec.name}-ift-{name}", join(output, name, "tensorboard"),
                                {"base_model": ref, "ift": _result_settings(cfg)})
    stream = MetricsStream([], tracker_sinks(trackers, storage, {"base_model": ref, "ift": _result_settings(cfg)}))
    try:
        model, history = finetune(model, splits.train, splits.val, cfg, device, log, on_metrics=stream.add)
    finally:
        stream.close()
    started = time.perf_counter()
    items = generate_answers(model, splits.test, cfg, log)
    generate_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix=f"raygpt-ift-{name}-") as local_dir:
        save_model_dir(model, model.config, local_dir)
        storage.upload(local_dir, layout.model_dir)
    summary = {"model": name, "base_model": ref, "seed": seed, "params": model.num_params(), "device": device,
               "base_step": base["step"], "steps": history["steps"], "best_step": history["best_step"],
               "initial_val_loss": history["val"][0]["loss"], "best_val_loss": history["best_val_loss"],
               "stopped_early": history["stopped_early"], "answers": len(items),
               "mean_response_tokens": sum(item["response_tokens"] for item in items) / len(items),
               "hit_token_limit": sum(item["hit_token_limit"] for item in items),
               "finetune_s": history["seconds"], "generate_s": generate_seconds, "answers_uri": layout.answers,
               "skipped": False}
    storage.write_json(layout.metrics, {"model": name, "base_model": ref, "base": base, "fingerprint": fingerprint,
                                        "dataset": dataset, "config": _result_settings(cfg),
                                        "history": history, "summary": summary})
    # Last: an answers file means this model is complete.
    storage.write_json(layout.answers, {
        "model": name, "base_model": ref, **({} if seed is None else {"seed": seed}), "base": base,
        "fingerprint": fingerprint,
        "generation": generation_settings(cfg),
        "dataset": {**dataset, "split": "test", "n": len(items)},
        "fine_tuning": {**{k: getattr(cfg, k) for k in ("epochs", "lr", "weight_decay", "batch_size", "mask_prompt",
                                                         "seed")},
                        "steps": history["steps"], "best_step": history["best_step"],
                        "best_val_loss": history["best_val_loss"], "model_dir": layout.model_dir},
        "items": items,
    })
    log(f"done: best val loss {history['best_val_loss']:.4f} at step {history['best_step']}; {layout.answers}")
    return summary


def _result_settings(cfg: IftConfig) -> dict[str, Any]:
    """The ift settings that change results (not where they go or how many CPUs run them)."""
    settings = recorded_spec(cfg)
    # seeds: which replicates exist, not how one is made (its own seed is in ``seed``).
    for key in ("models", "output", "cpus_per_model", "generation_batch_size", "data", "seeds"):
        settings.pop(key)
    return settings


def _fingerprint(ref: str, base: dict[str, Any], dataset: dict[str, Any], cfg: IftConfig) -> str:
    blob = json.dumps({"ref": ref, "base": base, "data_sha256": dataset["sha256"], "settings": _result_settings(cfg)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_ift(spec: RunSpec, address: str | None = None, num_cpus: int | None = None,
            force: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Fine-tune every ``ift.models`` entry in its own Ray task; returns the summaries (in the
    order of ``ift.models``) and the output folder. Failed models are one RaygptError naming
    each, after the others finished."""
    import ray

    from raygpt.cluster import cluster_has_gpus, connect, failure_message, task_runtime_env
    from raygpt.weights.refs import model_id

    cfg = spec.ift
    if not cfg.models:
        raise RaygptError("ift.models: no base models to fine-tune; list them in the spec or pass --model REF")
    get_prompt_style(cfg.prompt_style)
    bases = [model_id(ref) for ref in cfg.models]
    clashes = sorted({n for n in bases if bases.count(n) > 1})
    if clashes:
        raise RaygptError(f"ift.models: several models would be saved as {', '.join(clashes)}; list each once")
    # One task per model, or per model and seed: (ref, replicate seed or None, name).
    runs = [(ref, seed, replicate_id(base, seed)) for ref, base in zip(cfg.models, bases)
            for seed in (cfg.seeds or [None])]
    names = [name for _, _, name in runs]

    storage = Storage.from_config(spec.storage)
    output = _absolute(ift_dir(spec))
    source = cfg.data if is_url(cfg.data) else _absolute(cfg.data)
    storage.check_access(output, write=True)
    entries, sha256 = load_instruction_data(source, storage)
    splits = split_instruction_data(entries)
    dataset = {"source": without_userinfo(source), "sha256": sha256, "examples": len(entries),
               "train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    replicates = f" x {len(cfg.seeds)} seeds" if cfg.seeds else ""
    print(f"raygpt ift: {len(entries)} examples ({sha256[:12]}), split {len(splits.train)} train / "
          f"{len(splits.val)} val / {len(splits.test)} test; {len(cfg.models)} model(s){replicates} -> {output}",
          flush=True)

    connect(address, num_cpus)
    gpus = 1 if cluster_has_gpus() else 0
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes > 1 and not is_remote(output):
        log.warning("raygpt ift: warning: %s is a local path and the cluster has %d nodes: models "
                    "fine-tuned on other nodes write to those nodes' disks unless it is a shared filesystem; "
                    "use an s3:// output", output, nodes)
    task = ray.remote(finetune_one)
    splits_ref = ray.put(splits)
    pending = {
        task.options(num_cpus=cfg.cpus_per_model, num_gpus=gpus, name=f"ift-{name}",
                     runtime_env=task_runtime_env()).remote(
            ref, spec, storage, splits_ref, dataset, output, force, seed): (name, ref)
        for ref, seed, name in runs
    }
    summaries, failures = [], []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            name, ref = pending.pop(done[0])
            try:
                summaries.append(ray.get(done[0]))
            except ray.exceptions.RayTaskError as e:
                if not isinstance(e.cause, RaygptError):
                    log.error("%s", e)  # a bug, not bad input: the remote traceback helps
                failures.append(f"{name} ({ref}): {failure_message(e, 'fine-tuning')}")
            except ray.exceptions.RayError as e:  # its worker or node died: out of memory, a lost spot node
                failures.append(f"{name} ({ref}): {type(e).__name__}: {str(e).splitlines()[0]}")
    except KeyboardInterrupt:
        for task_ref in pending:
            ray.cancel(task_ref, force=True)
        raise
    summaries.sort(key=lambda s: names.index(s["model"]))
    if failures:
        if summaries:
            print_summary(summaries, output)
        raise RaygptError(f"{len(failures)} of {len(names)} model(s) failed: " + "; ".join(failures))
    return summaries, output


def _absolute(uri: str) -> str:
    """Local paths made absolute, so the paths written into results do not depend on a working directory."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().absolute())


def print_summary(summaries: list[dict[str, Any]], output: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Instruction fine-tuning -> {output}")
    for column in ("model", "params", "steps", "best step", "val loss", "answers", "mean tokens", "at limit", "time"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for s in summaries:
        seconds = s["finetune_s"] + s["generate_s"]
        table.add_row(s["model"] + (" (kept)" if s.get("skipped") else ""), f"{s['params'] / 1e6:.1f}M",
                      str(s["steps"]), str(s["best_step"]),
                      f"{s['initial_val_loss']:.3f} -> {s['best_val_loss']:.3f}", str(s["answers"]),
                      f"{s['mean_response_tokens']:.0f}", str(s["hit_token_limit"]),
                      f"{math.floor(seconds / 60)}m{seconds % 60:02.0f}s")
    console.print(table)
