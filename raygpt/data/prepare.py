"""``raygpt data prepare``: documents -> content-hash splits -> GPT-2 tokens -> shards + manifest.

Splits come from the content, not from a seed or a position: a document whose sha256 falls
into ``heldout_permille`` of 1000 buckets is held out (even buckets test, odd buckets
validation) and never enters training, in any run, whatever its budget; exact duplicates of
a held-out document are held out with it. The test split is the first ``test_tokens`` tokens
of test documents in source order, so every run on every machine is compared on the same
slice, however many training tokens it asked for.

Prepare stops when train holds its budget (``data.tokens``, or 20 tokens per parameter of the
``data.chinchilla`` preset) and val and test are full, or when the source ends. Once train is
full, documents are only hashed, not tokenized, until the held-out splits fill; with FineWeb
and the defaults (1% held out, 10M test tokens) that takes ~2B tokens' worth of streamed text,
whatever the training budget. Tokenizer threads feed the output in order, so the bytes do not
depend on the thread count; a re-run skips shards already stored with the same sha256.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from raygpt import __version__
from raygpt.data.manifest import (
    DTYPE,
    FORMAT,
    MANIFEST,
    SPLITS,
    manifest_hash,
    manifest_problem,
    sha256_file,
    shard_name,
)
from raygpt.data.sources import open_source
from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join
from raygpt.tokenizer import EOT_ID, VOCAB_SIZE

if TYPE_CHECKING:
    from rich.console import Console

    from raygpt.config import RunSpec


PROGRESS = "prepare-progress.json"


SPLIT_RULE = ("bucket = first 8 bytes of sha256(utf-8 text), big-endian, mod 1000; "
              "bucket < heldout_permille is held out: even buckets test, odd buckets val; the rest train")


CHINCHILLA_TOKENS_PER_PARAM = 20


_SHARD_FILE = re.compile(r"^(train|val|test)_\d{6}\.bin(\.tmp-\w+)?$")


def chinchilla_tokens(preset: str) -> int:
    """Chinchilla-optimal training tokens for a model preset: 20 per parameter
    (gpt2-small, untied: 20 x 163,009,536 = 3,260,190,720)."""
    import torch

    from raygpt.model import GPT, PRESETS

    with torch.device("meta"):  # counts parameters without allocating them
        return CHINCHILLA_TOKENS_PER_PARAM * GPT(PRESETS[preset]).num_params()


def assign_split(text: str, heldout_permille: int) -> str:
    """``train``, ``val`` or ``test`` for a document, from its content alone (see ``SPLIT_RULE``)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 1000
    if bucket >= heldout_permille:
        return "train"
    return "test" if bucket % 2 == 0 else "val"


def _valid_utf8(text: str) -> str:
    """Lone surrogates (possible in JSON) cannot be hashed or tokenized: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# A chunk is big enough to keep every tokenizer thread busy, small enough to hold in memory
# twice (one being tokenized, one being read).
CHUNK_DOCS = 256


CHUNK_CHARS = 4 << 20


@dataclass
class _Chunk:
    texts: list[str]
    splits: list[str]


def _tokenize_texts(texts: list[str], num_threads: int) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens, each followed by EOT, as one flat array plus per-document lengths."""
    from raygpt.tokenizer import get_tokenizer

    # encode_ordinary: '<|endoftext|>' written inside a document is text, not a separator.
    ids = get_tokenizer().encode_ordinary_batch(texts, num_threads=num_threads)
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=DTYPE)
    end = 0
    for doc in ids:
        flat[end:end + len(doc)] = doc
        end += len(doc)
        flat[end] = EOT_ID
        end += 1
    return flat, lengths


def _tokenized(chunks: Iterator[_Chunk], num_threads: int) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
    """Tokenize chunks on ``num_threads`` threads (tiktoken encodes outside the GIL), one chunk
    ahead of the caller, which reads and writes meanwhile; yields in input order, so the output
    bytes do not depend on the number of threads."""
    with ThreadPoolExecutor(1, thread_name_prefix="raygpt-tokenize") as ahead:
        pending: tuple[_Chunk, Future] | None = None
        try:
            for chunk in chunks:
                submitted = (chunk, ahead.submit(_tokenize_texts, chunk.texts, num_threads))
                if pending is not None:
                    done, pending = pending, None
                    yield done[0], *done[1].result()
                pending = submitted
        except Exception:  # reading the source failed: what it gave before is written, so a re-run resumes after it
            if pending is not None:
                yield pending[0], *pending[1].result()
            raise
        if pending is not None:
            yield pending[0], *pending[1].result()


class _ShardStore:
    """Writes finished shards to the dataset folder in a background thread, one at a time (so
    at most one finished shard waits in memory), skipping any already stored with the same
    sha256 and size, and keeps a progress record of what is stored so a re-run can skip it."""

    def __init__(self, storage: Storage, output: str):
        self.storage, self.output = storage, output
        self.written: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self._stored = _stored_sizes(storage, output)
        self._known = self._known_shards()
        self._progress: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._manifest_dropped = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="raygpt-shard-writer")
        self._pending: Future | None = None

    def _known_shards(self) -> dict[str, dict]:
        """Shards a previous run recorded: the old manifest's, then the progress record's."""
        known: dict[str, dict] = {}
        for name in (MANIFEST, PROGRESS):
            if name not in self._stored:
                continue
            try:
                record = self.storage.read_json(join(self.output, name))
            except RaygptError:
                continue  # unreadable: its shards are simply written again
            if name == MANIFEST and not manifest_problem(record):
                known.update({s["name"]: s for split in SPLITS for s in record["splits"][split]["shards"]})
            elif name == PROGRESS and isinstance(record, dict) and isinstance(record.get("shards"), dict):
                known.update(record["shards"])
        return known

    def put(self, split: str, shard: dict, data: bytes) -> None:
        if self._already_stored(shard, len(data)):
            self.skipped[split] += 1
            with self._lock:
                self._progress[shard["name"]] = shard
            return
        self._wait()
        self._pending = self._executor.submit(self._write, split, shard, data)

    def _already_stored(self, shard: dict, size: int) -> bool:
        """Recorded with this sha256 and stored with this size. A local file is also hashed (cheap);
        an S3 object is trusted on its record, as re-reading it would cost as much as writing it."""
        recorded = self._known.get(shard["name"], {}).get("sha256")
        if recorded != shard["sha256"] or self._stored.get(shard["name"]) != size:
            return False
        uri = join(self.output, shard["name"])
        return is_remote(uri) or sha256_file(Path(self.storage.resolve(uri)[1])) == shard["sha256"]

    def _write(self, split: str, shard: dict, data: bytes) -> None:
        self.drop_manifest()
        self.storage.write_bytes(join(self.output, shard["name"]), data)
        with self._lock:
            self._progress[shard["name"]] = shard
            record = {"format": FORMAT, "shards": dict(self._progress)}
        self.storage.write_json(join(self.output, PROGRESS), record)
        self.written[split] += 1

    def drop_manifest(self) -> None:
        """The dataset is about to change: until the new manifest lands it is unfinished."""
        if not self._manifest_dropped:
            self.storage.delete(join(self.output, MANIFEST))
            self._manifest_dropped = True

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def commit(self, manifest: dict) -> None:
        """Remove shards the new manifest does not list, then write the manifest, last."""
        self._wait()
        listed = {s["name"] for split in SPLITS for s in manifest["splits"][split]["shards"]}
        stale = [name for name in self.storage.list(self.output) if _SHARD_FILE.match(name) and name not in listed]
        if stale:
            self.drop_manifest()
        for name in stale:
            self.storage.delete(join(self.output, name))
        self.storage.write_json(join(self.output, MANIFEST), manifest)
        self.storage.delete(join(self.output, PROGRESS))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _stored_sizes(storage: Storage, output: str) -> dict[str, int]:
    try:
        return storage.file_sizes(output)
    except RaygptError:
        return {}  # check_access has already proven the folder reachable; an unlistable one holds nothing of ours


class _SplitWriter:
    """Cuts one split's token stream into ``shard_tokens``-sized shards (the last may be shorter)."""

    def __init__(self, split: str, shard_tokens: int, store: _ShardStore):
        self.split, self.store = split, store
        self.buffer = np.empty(shard_tokens, dtype=DTYPE)
        self.filled = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self._flush()

    def finish(self) -> None:
        if self.filled:
            self._flush()

    def _flush(self) -> None:
        data = self.buffer[:self.filled].tobytes()
        shard = {"name": shard_name(self.split, len(self.shards)), "tokens": self.filled,
                 "sha256": hashlib.sha256(data).hexdigest()}
        self.shards.append(shard)
        self.store.put(self.split, shard, data)
        self.filled = 0


def prepare(spec: RunSpec, storage: Storage, console: Console | None = None) -> dict:
    """Tokenize ``spec.data.source`` into shards at ``spec.data.output``; returns the manifest.

    Stops when the training split has its budget and validation and test are full, or when the
    source ends. Re-running resumes: shards already stored with the same sha256 are not
    written again. ``console``: where progress and the summary go (None: silent).
    """
    data = spec.data
    source = open_source(data)
    storage.check_access(data.output, write=True)
    train_budget = chinchilla_tokens(data.chinchilla) if data.chinchilla else data.tokens
    budgets = {"train": train_budget, "val": data.val_tokens, "test": data.test_tokens}
    num_threads = data.num_proc or os.cpu_count() or 1
    if console is not None:
        console.print(f"[bold]source[/]: {data.source}: {source.description}")
        budget_text = f"{train_budget:,} train tokens" if train_budget is not None else "the whole source for training"
        console.print(f"[bold]budget[/]: {budget_text}"
                      + (f" (Chinchilla, 20 x params of {data.chinchilla})" if data.chinchilla else "")
                      + f", {data.val_tokens:,} val, {data.test_tokens:,} test; {num_threads} tokenizer thread(s)")

    store = _ShardStore(storage, data.output)
    writers = {split: _SplitWriter(split, data.shard_tokens, store) for split in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)

    def full(split: str) -> bool:
        return budgets[split] is not None and tokens[split] >= budgets[split]

    def chunks() -> Iterator[_Chunk]:
        # Skipping here uses counts of documents already consumed, which all precede these ones
        # in source order, so a skipped document would have been dropped in order anyway:
        # the output does not depend on how far ahead this producer runs.
        chunk, chars = _Chunk([], []), 0
        for text in source.documents():
            if all(full(s) for s in SPLITS):
                break
            if not isinstance(text, str) or not text.strip():
                continue
            text = _valid_utf8(text)
            split = assign_split(text, data.heldout_permille)
            if full(split):
                continue
            chunk.texts.append(text)
            chunk.splits.append(split)
            chars += len(text)
            if len(chunk.texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield chunk
                chunk, chars = _Chunk([], []), 0
        if chunk.texts:
            yield chunk

    exhausted = True
    try:
        total = sum(budgets.values()) if train_budget is not None else None
        with _progress_bar(console, total) as advance, closing(_tokenized(chunks(), num_threads)) as tokenized:
            for chunk, flat, lengths in tokenized:
                taken = 0
                for split, end, length in zip(chunk.splits, np.cumsum(lengths), lengths):
                    if full(split):
                        continue
                    room = length if budgets[split] is None else min(length, budgets[split] - tokens[split])
                    writers[split].add(flat[end - length:end - length + room])
                    tokens[split] += int(room)
                    documents[split] += 1
                    taken += int(room)
                advance(taken, len(chunk.texts))
                if all(full(s) for s in SPLITS):
                    exhausted = False
                    break
        for writer in writers.values():
            writer.finish()
        manifest = {
            "format": FORMAT, "tokenizer": "gpt2", "dtype": "uint16", "eot_id": EOT_ID, "vocab_size": VOCAB_SIZE,
            "source": data.source, "source_description": source.description, "source_revision": source.revision,
            "text_column": data.text_column, "txt_documents": data.txt_documents,
            "heldout_permille": data.heldout_permille, "split_rule": SPLIT_RULE,
            "budget": {"train_tokens": train_budget, "chinchilla": data.chinchilla,
                       "val_tokens": data.val_tokens, "test_tokens": data.test_tokens},
            "shard_tokens": data.shard_tokens, "source_exhausted": exhausted, "raygpt_version": __version__,
            "splits": {split: {"tokens": tokens[split], "documents": documents[split], "shards": writers[split].shards}
                       for split in SPLITS},
        }
        store.commit(manifest)
    finally:
        store.close()
    if console is not None:
        _print_summary(console, manifest, store, budgets)
    return manifest


@contextmanager
def _progress_bar(console: Console | None, total: int | None) -> Iterator[Callable[[int, int], None]]:
    """``advance(tokens, docs)``: a live rich bar with tokens/s and docs/s on a terminal; a line
    every 30 s elsewhere (Ray job logs, files), where a live bar would show nothing until the end."""
    if console is None:
        yield lambda tokens, docs: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    start = last_line = time.monotonic()
    counts = {"tokens": 0, "docs": 0}

    def rate() -> str:
        elapsed = max(time.monotonic() - start, 1e-9)
        return f"{counts['tokens'] / elapsed / 1e6:.2f}M tok/s, {counts['docs'] / elapsed:,.0f} docs/s"

    with Progress(TextColumn("[bold]tokenizing"), BarColumn(), TextColumn("{task.completed:,} tokens"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task("tokenize", total=total, rate="")

        def advance(tokens: int, docs: int) -> None:
            nonlocal last_line
            counts["tokens"] += tokens
            counts["docs"] += docs
            bar.update(task, advance=tokens, rate=rate())
            if not console.is_terminal and time.monotonic() - last_line >= 30:
                last_line = time.monotonic()
                of_total = f" of {total:,} ({counts['tokens'] / total:.1%})" if total else ""
                console.print(f"tokenized {counts['tokens']:,}{of_total} tokens, {rate()}")

        yield advance


def _print_summary(console: Console, manifest: dict, store: _ShardStore, budgets: dict) -> None:
    from rich.table import Table

    table = Table(title=f"dataset {manifest_hash(manifest)[:12]}", title_justify="left")
    for column in ("split", "documents", "tokens", "shards", "written", "skipped (already stored)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in SPLITS:
        info = manifest["splits"][split]
        table.add_row(split, f"{info['documents']:,}", f"{info['tokens']:,}", str(len(info["shards"])),
                      str(store.written[split]), str(store.skipped[split]))
    console.print(table)
    for split in SPLITS:
        if budgets[split] is not None and manifest["splits"][split]["tokens"] < budgets[split]:
            console.print(f"[yellow]warning[/]: the source ended before {split} was full: "
                          f"{manifest['splits'][split]['tokens']:,} of {budgets[split]:,} tokens")
    console.print(f"manifest: {join(store.output, MANIFEST)}")
