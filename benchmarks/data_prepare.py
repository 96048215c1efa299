"""Throughput of ``raygpt data prepare``: tokens/s for a number of tokenizer threads.

The corpus is the standard library's docstrings (real English prose and code, no download),
repeated to the requested size and written as a .jsonl file, so the whole path is measured:
reading, content hashing, tokenization, shard writes. The first rows measure the tokenizer
alone on a sample, two ways: tiktoken's ``encode_ordinary_batch`` on N threads of this
process (what prepare does: tiktoken encodes outside the GIL), and N spawned processes
encoding chunks of it (what prepare did before; the pool has to ship every text and token
list between processes). Each row is the best of ``--repeat`` runs, which matters on a
machine that other work shares.

    python benchmarks/data_prepare.py --mb 200 --threads 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from raygpt.config import DataConfig, RunSpec
from raygpt.data.prepare import prepare
from raygpt.data.sources import open_source
from raygpt.storage import Storage
from raygpt.tokenizer import get_tokenizer

CHUNK_DOCS = 256


def write_corpus(path: Path, megabytes: float, sample_mb: float) -> list[str]:
    documents = list(open_source(DataConfig(source="stdlib")).documents())
    target, written, copy = megabytes * 1e6, 0, 0
    sample, sampled = [], 0
    with open(path, "w") as f:
        while written < target:
            for text in documents:
                text = f"{text}\n\n(copy {copy})"  # distinct texts, so the held-out share stays ~1%
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                if sampled < sample_mb * 1e6:
                    sample.append(text)
                    sampled += len(text)
                if written >= target:
                    break
            copy += 1
    return sample


def _encode_chunk(texts: list[str]) -> int:
    encoding = get_tokenizer()
    return sum(len(encoding.encode_ordinary(text)) for text in texts)


def encode_in_processes(sample: list[str], processes: int) -> int:
    chunks = [sample[i:i + CHUNK_DOCS] for i in range(0, len(sample), CHUNK_DOCS)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_encode_chunk, chunks))


def best_of(repeat: int, run: Callable[[], int]) -> tuple[int, float]:
    """(tokens, fastest seconds) of ``repeat`` runs."""
    times, tokens = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - start)
    return tokens, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB of text")
    parser.add_argument("--sample-mb", type=float, default=20, help="text the tokenizer-only rows encode")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is shown")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raygpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    sample = write_corpus(corpus, args.mb, args.sample_mb)
    load = os.getloadavg()[0]
    table = Table(title=f"raygpt data prepare: {args.mb:g} MB of text ({args.sample_mb:g} MB for the tokenizer "
                        f"alone), {os.cpu_count()} CPUs, load average {load:.1f} at the start, best of "
                        f"{args.repeat}", title_justify="left")
    for column in ("what", "workers", "tokens", "seconds", "M tokens/s"):
        table.add_column(column, justify="left" if column == "what" else "right")

    def row(what: str, workers: int, tokens: int, seconds: float) -> None:
        table.add_row(what, str(workers), f"{tokens:,}", f"{seconds:.2f}", f"{tokens / seconds / 1e6:.2f}")

    encoding = get_tokenizer()
    for n in args.threads:
        row("tokenizer alone: encode_ordinary_batch, threads", n, *best_of(args.repeat, lambda n=n: sum(
            len(ids) for ids in encoding.encode_ordinary_batch(sample, num_threads=n))))
        row("tokenizer alone: spawned processes", n, *best_of(args.repeat, lambda n=n: encode_in_processes(sample, n)))

    for n in args.threads:
        out = work / f"out-{n}"

        def run(n: int = n, out: Path = out) -> int:
            shutil.rmtree(out, ignore_errors=True)
            spec = RunSpec(data=DataConfig(source=str(corpus), output=str(out), tokens=None, num_proc=n,
                                           shard_tokens=20_000_000, val_tokens=100_000, test_tokens=100_000))
            manifest = prepare(spec, Storage())
            return sum(manifest["splits"][s]["tokens"] for s in manifest["splits"])

        row("prepare (read, hash, tokenize, write)", n, *best_of(args.repeat, run))
    Console().print(table)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
