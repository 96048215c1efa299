"""Evaluation tasks: test loss on the fixed held-out test split, and HellaSwag.

``raygpt eval SPEC [--model REF]... [--task T]...`` runs each task in ``eval.tasks`` as one
Ray task per model (a GPU each when the cluster has GPUs).

- ``test_loss``: all models read the same windows: the first ``eval.max_tokens`` test tokens
  cut into non-overlapping windows of one length (``eval.seq_len``, else the shortest context
  among the models), so losses are comparable across architectures and runs. The mean token
  loss is computed in fp32 in a fixed order, so a rerun gives the same number. Results go to
  ``<eval.output or storage_path/eval>/test_loss.json``, merged with earlier results on the
  same dataset.
- ``hellaswag``: completion-style accuracy (``raygpt.hellaswag``: acc and acc_norm, as
  llm.c and build-nanogpt score it) on ``eval.hellaswag_data``, read once by the driver and
  shared with the tasks. Results go to ``hellaswag.json`` beside the test loss, merged with
  earlier results on the same items.

Each is shown as a table.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

from raygpt.config import RunSpec
from raygpt.errors import RaygptError
from raygpt.stages import HELLASWAG_FILE, TEST_LOSS_FILE, eval_dir
from raygpt.storage import Storage, join, without_userinfo
from raygpt.weights.refs import describe_model, load_model


@torch.no_grad()
def token_loss_sums(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str,
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[float, int]:
    """(sum of per-token cross-entropies, number of tokens) of ``model`` over ``batches``.

    Sums rather than a mean, so shares computed by several workers combine exactly. Both stay
    on the device until the end: one host sync per call, not one per batch.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            _, loss = model(x, y)
        n = (y != -100).sum()
        total += loss.double() * n
        count += n
    model.train(was_training)
    return float(total), int(count)


def model_test_loss(ref: str, spec: RunSpec, storage: Storage, seq_len: int) -> dict[str, Any]:
    """Mean token loss of one model over the fixed test windows (runs inside a Ray task)."""
    from raygpt.data.batches import eval_batches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # TF32 matmuls on GPUs: still deterministic, and their error averages out far below the
    # differences between models over millions of tokens.
    torch.backends.cuda.matmul.allow_tf32 = True
    model, info = load_model(ref, spec, storage, device)
    batches = eval_batches(spec.eval.dataset, storage, "test", seq_len, spec.eval.batch_size,
                           max_tokens=spec.eval.max_tokens)
    total, count = token_loss_sums(model, batches, device)
    return {"model": info["id"], "ref": ref, "test_loss": total / count, "tokens": count,
            "params": info["params"], "step": info["step"], "trained_tokens": info["tokens"],
            "checkpoint": info["checkpoint"], "device": str(device)}


def per_model_tasks(function, models: list[str], args: tuple, what: str, address: str | None,
                    num_cpus: int | None) -> list[dict[str, Any]]:
    """``function(ref, *args)`` for every model, each in its own Ray task (a GPU each when the
    cluster has GPUs); the first failure is one RaygptError."""
    import ray

    from raygpt.cluster import cluster_has_gpus, connect, failure_message, task_runtime_env

    connect(address, num_cpus)
    task = ray.remote(function).options(num_gpus=1 if cluster_has_gpus() else 0, num_cpus=1, max_retries=1,
                                        runtime_env=task_runtime_env())
    shared = [ray.put(a) for a in args]  # once, not once per model
    try:
        return ray.get([task.remote(ref, *shared) for ref in models])
    except ray.exceptions.RayTaskError as e:
        raise RaygptError(failure_message(e, what)) from None


def earlier_results(uri: str, storage: Storage, results: list[dict[str, Any]], **same: Any) -> list[dict[str, Any]]:
    """The results already in ``uri`` for models not evaluated now, when it was measured the
    same way (every key of ``same`` equal): a document gathers models evaluated at other times."""
    previous = storage.read_json(uri) if storage.exists(uri) else None
    if not previous or any(previous.get(key) != value for key, value in same.items()):
        return []
    evaluated = {r["ref"] for r in results}
    return [r for r in previous.get("results", []) if r["ref"] not in evaluated]


def evaluate(spec: RunSpec, models: list[str], address: str | None = None,
             num_cpus: int | None = None) -> dict[str, Any]:
    """Score ``models`` on the test split and write ``test_loss.json``; returns its contents."""
    from raygpt.data.batches import count_eval_windows
    from raygpt.data.manifest import load_manifest, manifest_hash

    if not models:
        raise RaygptError("eval.models: no models to evaluate; list them in the spec or pass --model REF")
    storage = Storage.from_config(spec.storage)
    output = eval_dir(spec)
    storage.check_access(output, write=True)
    manifest = load_manifest(spec.eval.dataset, storage)
    # Every model's architecture (and folder) now, so a typo fails before any task starts.
    configs = {ref: describe_model(ref, spec, storage)[0] for ref in models}
    seq_len = spec.eval.seq_len or min(c.context_length for c in configs.values())
    too_short = [ref for ref, c in configs.items() if c.context_length < seq_len]
    if too_short:
        raise RaygptError(f"eval.seq_len: {seq_len} exceeds the context length of {', '.join(too_short)}")
    windows = count_eval_windows(manifest, "test", seq_len, spec.eval.max_tokens)
    if windows == 0:
        test_tokens = manifest["splits"]["test"]["tokens"]
        if spec.eval.max_tokens is not None and spec.eval.max_tokens < test_tokens:
            raise RaygptError(f"eval.max_tokens: {spec.eval.max_tokens:,} test tokens are fewer than one window of "
                              f"{seq_len + 1} (the sequence length {seq_len} and its next token); raise "
                              "eval.max_tokens or lower eval.seq_len")
        raise RaygptError(f"{spec.eval.dataset}: the test split has {test_tokens:,} tokens, "
                          f"fewer than one window of {seq_len + 1}")

    results = per_model_tasks(model_test_loss, models, (spec, storage, seq_len), "evaluation", address, num_cpus)
    digest = manifest_hash(manifest)
    uri = join(output, TEST_LOSS_FILE)
    kept = earlier_results(uri, storage, results, manifest_sha256=digest, seq_len=seq_len,
                           test_tokens=windows * seq_len)
    document = {"dataset": spec.eval.dataset, "manifest_sha256": digest, "split": "test", "seq_len": seq_len,
                "test_tokens": windows * seq_len, "results": sorted(kept + results, key=lambda r: r["test_loss"])}
    storage.write_json(uri, document)
    return {**document, "uri": uri}


def show_results(document: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"test loss on {document['test_tokens']:,} tokens of {document['dataset']} "
                        f"(windows of {document['seq_len']})")
    for column in ("model", "params", "step", "trained tokens", "test loss"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in document["results"]:
        table.add_row(r["model"], f"{r['params'] / 1e6:,.2f}M", _or_dash(r.get("step")),
                      _or_dash(r.get("trained_tokens")), f"{r['test_loss']:.4f}")
    console.print(table)


def _or_dash(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def model_hellaswag(ref: str, spec: RunSpec, storage: Storage, items: list) -> dict[str, Any]:
    """HellaSwag accuracy of one model on ``items`` (runs inside a Ray task)."""
    from raygpt.hellaswag import score_items

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    model, info = load_model(ref, spec, storage, device)
    scores = score_items(model, items, device, batch_size=spec.eval.batch_size)
    return {"model": info["id"], "ref": ref, **scores, "params": info["params"], "step": info["step"],
            "trained_tokens": info["tokens"], "checkpoint": info["checkpoint"], "device": str(device)}


def evaluate_hellaswag(spec: RunSpec, models: list[str], address: str | None = None,
                       num_cpus: int | None = None) -> dict[str, Any]:
    """Score ``models`` on HellaSwag and write ``hellaswag.json``; returns its contents."""
    from raygpt.hellaswag import load_items

    if not models:
        raise RaygptError("eval.models: no models to evaluate; list them in the spec or pass --model REF")
    storage = Storage.from_config(spec.storage)
    output = eval_dir(spec)
    storage.check_access(output, write=True)
    for ref in models:  # a typo fails before the download and before any task starts
        describe_model(ref, spec, storage)
    items, sha256 = load_items(spec.eval.hellaswag_data, storage=storage)
    items = items[:spec.eval.hellaswag_max_items]

    results = per_model_tasks(model_hellaswag, models, (spec, storage, items), "HellaSwag evaluation", address,
                              num_cpus)
    uri = join(output, HELLASWAG_FILE)
    kept = earlier_results(uri, storage, results, data_sha256=sha256, items=len(items))
    document = {"task": "hellaswag", "data": without_userinfo(spec.eval.hellaswag_data), "data_sha256": sha256,
                "items": len(items),
                "scoring": "completion (llm.c, build-nanogpt): acc by summed, acc_norm by mean ending token loss",
                "results": sorted(kept + results, key=lambda r: -r["acc_norm"])}
    storage.write_json(uri, document)
    return {**document, "uri": uri}


def show_hellaswag(document: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"HellaSwag on {document['items']:,} items of {document['data']} (completion style)")
    for column in ("model", "params", "step", "trained tokens", "acc", "acc_norm"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in document["results"]:
        table.add_row(r["model"], f"{r['params'] / 1e6:,.2f}M", _or_dash(r.get("step")),
                      _or_dash(r.get("trained_tokens")), f"{r['acc']:.4f}", f"{r['acc_norm']:.4f}")
    console.print(table)


EVAL_TASKS = {"test_loss": (evaluate, show_results), "hellaswag": (evaluate_hellaswag, show_hellaswag)}
"""``eval.tasks`` names: (the function that evaluates models and writes its document, its table)."""
