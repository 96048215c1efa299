"""``raygpt quickstart``: the whole path on one machine in a few minutes, offline if need be.

1. An S3 store: SeaweedFS (``weed mini``) in ``<workdir>/s3``, started here and stopped at the
   end (also on errors and Ctrl-C), unless ``--endpoint`` or ``AWS_ENDPOINT_URL`` names one.
2. A local Ray instance, started after the store so its workers inherit the credentials.
3. A corpus: ``--source``; else FineWeb streamed from the hub when it is reachable; else the
   docstrings of the Python standard library, which every installation carries (announced).
4. ``data prepare`` into the store, and the unigram entropy of the training split: the loss
   of a model that only counts tokens, the line the trained model must get below.
5. A tiny GPT-2 trained by 2 DDP workers on CPU with checkpoints in the store, its test loss,
   and a sample of its text.
6. A summary table (val loss beside the unigram entropy), also written to
   ``<workdir>/summary.json``.

The settings are ``raygpt/presets/quickstart.yaml``; ``--set`` overrides them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raygpt.config import DataConfig, RunSpec, load_spec, without_userinfo
from raygpt.errors import RaygptError
from raygpt.localstore import S3_PORT, SeaweedFS, free_port_block
from raygpt.storage import Storage, join

PRESET = Path(__file__).parent.parent / "presets" / "quickstart.yaml"


def start_store(args, workdir: Path, console: Console, stack: contextlib.ExitStack) -> str:
    """The S3 endpoint to use; starts SeaweedFS (stopped by ``stack``) when none is configured."""
    endpoint = args.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        console.print(f"[bold]store[/]: the S3 endpoint {without_userinfo(endpoint)}, bucket {args.bucket} "
                      "(credentials from the AWS environment)")
        return endpoint
    try:
        store = SeaweedFS(workdir / "s3", bucket=args.bucket, port=S3_PORT).start()
    except RaygptError as e:
        if "already in use" not in str(e):
            raise
        store = SeaweedFS(workdir / "s3", bucket=args.bucket, port=free_port_block()).start()
    stack.callback(store.stop)
    os.environ.update(store.env())  # for this process and, through Ray's inheritance, its workers
    console.print(f"[bold]store[/]: SeaweedFS at {store.endpoint_url}, bucket {args.bucket}, data in {workdir / 's3'}")
    return store.endpoint_url


def choose_source(requested: str | None, console: Console) -> str:
    """``requested``, else FineWeb when the hub answers, else the standard library's docstrings."""
    from raygpt.data.sources import open_source

    if requested:
        return requested
    try:
        open_source(DataConfig(source="fineweb"))  # one quick metadata request
        console.print("[bold]corpus[/]: FineWeb (sample-10BT), streamed from the Hugging Face hub")
        return "fineweb"
    except RaygptError as e:
        reason = str(e).split("(", 1)[-1].split(")", 1)[0] if "(" in str(e) else str(e)
        console.print(f"[bold]corpus[/]: the Hugging Face hub is not reachable ({reason}), so the quickstart uses the "
                      "docstrings of the Python standard library: an offline corpus every Python installation "
                      "carries. It is not web text; pass --source PATH for your own files.")
        return "stdlib"


def quickstart_spec(bucket: str, source: str, overrides: list[str]) -> RunSpec:
    """The embedded preset with this store's locations, a fresh run name, and the user's overrides."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(source.rstrip("/")).name if "/" in source else source).strip("-")
    dataset = f"s3://{bucket}/datasets/quickstart-{slug or 'corpus'}"
    return load_spec(PRESET, [
        f"name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}", f"storage_path=s3://{bucket}/runs",
        f"data.source={source}", f"data.output={dataset}", f"train.dataset={dataset}", f"eval.dataset={dataset}",
        *overrides])


def summary_row(spec: RunSpec, record: dict[str, Any], test: dict[str, Any], entropy: float) -> dict[str, Any]:
    final = record.get("final") or {}
    return {"run": spec.name, "params": record["model"]["params"], "tokens": final.get("tokens"),
            "steps": final.get("step"), "time_s": final.get("session_s"), "tokens_per_s": final.get("tokens_per_s"),
            "val_loss": final.get("val_loss"), "unigram_entropy": entropy, "test_loss": test["test_loss"],
            "test_tokens": test["tokens"], "run_uri": join(spec.storage_path, spec.name)}


def show_summary(row: dict[str, Any], console: Console) -> None:
    table = Table(title="raygpt quickstart", title_justify="left")
    table.add_column("run", no_wrap=True)
    for column in ("params", "tokens", "steps", "time", "tokens/s", "val loss", "unigram entropy", "test loss"):
        table.add_column(column, justify="right")

    def number(value, fmt):
        return format(value, fmt) if value is not None else "-"

    table.add_row(row["run"], f"{row['params'] / 1e6:.2f}M", number(row["tokens"], ","), number(row["steps"], ","),
                  f"{number(row['time_s'], '.0f')} s", number(row["tokens_per_s"], ",.0f"),
                  number(row["val_loss"], ".4f"), number(row["unigram_entropy"], ".4f"),
                  number(row["test_loss"], ".4f"))
    console.print(table)
    if row["val_loss"] is not None:
        gap = row["unigram_entropy"] - row["val_loss"]
        if gap > 0:
            console.print(f"val loss {row['val_loss']:.3f} nats/token: {gap:.3f} below the unigram entropy of the "
                          f"training split ({row['unigram_entropy']:.3f}), the loss of a model that only counts "
                          "tokens: that much it learned from context")
        else:
            console.print(f"val loss {row['val_loss']:.3f} nats/token: {-gap:.3f} above the unigram entropy of the "
                          f"training split ({row['unigram_entropy']:.3f}): the model has not yet learned even how "
                          "often each token occurs; train longer (--set train.max_steps=...)")


def final_sample(spec: RunSpec, storage: Storage, console: Console) -> dict[str, str]:
    """The trained model's continuation of the first of ``log.sample_prompts``, streamed."""
    import torch

    from raygpt.sample import sample_text
    from raygpt.weights.refs import load_model

    prompt = spec.log.sample_prompts[0] if spec.log.sample_prompts else ""
    model, _ = load_model(spec.name, spec, storage, "cpu")
    console.print(f"[bold]{escape(prompt)}[/]", end="", highlight=False)
    text = sample_text(model, prompt, max_new_tokens=48, temperature=0.8, top_k=50,
                       generator=torch.Generator().manual_seed(spec.train.seed),
                       on_text=lambda piece: console.out(piece, end="", highlight=False))
    console.out("")
    return {"prompt": prompt, "text": text}


def quickstart_command(args) -> int:
    """``raygpt quickstart [--workdir DIR] [--source S] [--endpoint URL] [--bucket B] [--set k=v]``."""
    import ray

    from raygpt.cluster import connect
    from raygpt.data.prepare import prepare
    from raygpt.data.unigram import unigram_entropy
    from raygpt.evaluate import evaluate
    from raygpt.train.launch import train

    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the summary table
        console = Console(width=120)
    workdir = Path(args.workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    begun = time.time()
    with contextlib.ExitStack() as stack:
        endpoint = start_store(args, workdir, console, stack)
        source = choose_source(args.source, console)
        spec = quickstart_spec(args.bucket, source, list(getattr(args, "overrides", []) or []))
        storage = Storage.from_config(spec.storage)
        storage.check_access(spec.storage_path, write=True)

        # Its own Ray instance: the store listens on this machine only.
        os.environ.pop("RAY_ADDRESS", None)
        connect(None, num_cpus=max(2, os.cpu_count() or 1))
        stack.callback(ray.shutdown)

        console.rule("data prepare")
        prepare(spec, storage, console)
        entropy = unigram_entropy(spec.train.dataset, storage)
        console.print(f"unigram entropy of the training split: {entropy:.4f} nats/token (the loss of a model that "
                      "only counts tokens; the val loss should get below it)")
        console.rule(f"train {spec.name}: {spec.model.preset} model, {spec.train.num_workers} workers on CPU")
        record = train(spec, console=console)
        console.rule("test loss")
        document = evaluate(spec, [spec.name])
        test = next(r for r in document["results"] if r["ref"] == spec.name)
        console.rule("sample")
        sample = final_sample(spec, storage, console)

        row = {**summary_row(spec, record, test, entropy), "sample": sample, "source": source,
               "endpoint": without_userinfo(endpoint), "total_s": time.time() - begun}
        (workdir / "summary.json").write_text(json.dumps(row, indent=2) + "\n")
        console.rule("summary")
        show_summary(row, console)
        console.print(f"run: {row['run_uri']} (checkpoints, run.json, metrics.jsonl); test loss: {document['uri']}")
        console.print(f"summary: {workdir / 'summary.json'}; quickstart took {row['total_s']:.0f} s")
    return 0
