"""Throughput of ``raygpt data prepare``: tokens/s for a number of tokenizer processes.

The corpus is the standard library's docstrings (real English prose and code, no download),
repeated to the requested size and written as a .jsonl file, so the whole path is measured:
reading, content hashing, tokenization in worker processes, shard writes. The first row is
tiktoken alone in this process, for reference.

    python benchmarks/data_prepare.py --mb 200 --procs 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from raygpt.config import DataConfig, RunSpec
from raygpt.data.prepare import prepare
from raygpt.data.sources import open_source
from raygpt.storage import Storage
from raygpt.tokenizer import get_tokenizer


def write_corpus(path: Path, megabytes: float) -> list[str]:
    documents = list(open_source(DataConfig(source="stdlib")).documents())
    target, written, copy = megabytes * 1e6, 0, 0
    sample = []
    with open(path, "w") as f:
        while written < target:
            for text in documents:
                text = f"{text}\n\n(copy {copy})"  # distinct texts, so the held-out share stays ~1%
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                if len(sample) < 2000:
                    sample.append(text)
                if written >= target:
                    break
            copy += 1
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB of text")
    parser.add_argument("--procs", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raygpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    sample = write_corpus(corpus, args.mb)
    console = Console()
    table = Table(title=f"raygpt data prepare: {args.mb:g} MB of text, {os.cpu_count()} CPUs", title_justify="left")
    for column in ("what", "processes", "tokens", "seconds", "M tokens/s", "docs/s"):
        table.add_column(column, justify="left" if column == "what" else "right")

    encoding = get_tokenizer()
    start = time.perf_counter()
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(sample, num_threads=1))
    seconds = time.perf_counter() - start
    table.add_row("tiktoken alone (sample)", "1", f"{tokens:,}", f"{seconds:.2f}", f"{tokens / seconds / 1e6:.2f}",
                  f"{len(sample) / seconds:,.0f}")

    for procs in args.procs:
        out = work / f"out-{procs}"
        shutil.rmtree(out, ignore_errors=True)
        spec = RunSpec(data=DataConfig(source=str(corpus), output=str(out), tokens=None, num_proc=procs,
                                       shard_tokens=20_000_000, val_tokens=100_000, test_tokens=100_000))
        start = time.perf_counter()
        manifest = prepare(spec, Storage())
        seconds = time.perf_counter() - start
        tokens = sum(manifest["splits"][s]["tokens"] for s in manifest["splits"])
        docs = sum(manifest["splits"][s]["documents"] for s in manifest["splits"])
        table.add_row("prepare (read, hash, tokenize, write)", str(procs), f"{tokens:,}", f"{seconds:.2f}",
                      f"{tokens / seconds / 1e6:.2f}", f"{docs / seconds:,.0f}")
    console.print(table)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
