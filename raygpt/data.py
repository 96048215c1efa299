"""Token shards: ``raygpt data prepare`` writes them; training and evaluation read them.

A prepared dataset is a folder (local or ``s3://``) of ``{split}_{index:06d}.bin`` files of raw
little-endian uint16 GPT-2 tokens, each document followed by ``<|endoftext|>``, plus
``manifest.json`` (token counts and sha256 per shard, tokenizer, source, split rule, budget),
written LAST: a folder without a manifest is an unfinished dataset.

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
whatever the training budget. A .txt file is one document, or one per blank-line-separated
block with ``data.txt_documents: paragraphs``.

Training reads with ``TrainBatches``: a hierarchical shuffle that depends on (seed, step)
only. Each epoch permutes the train shards, then the sequences within each shard; global
batch ``step`` is the next ``global_batch_size`` sequences of that order, and worker ``r`` of
``W`` takes the r-th contiguous slice. The same run on 2 or 4 workers therefore sees the same
samples at every step, and a run can resume on a different number of workers. Each worker
only needs one or two shards at a time, cached on the node and prefetched in the background.
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import fcntl
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sysconfig
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from raygpt import __version__
from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join
from raygpt.tokenizer import EOT_ID, VOCAB_SIZE

if TYPE_CHECKING:  # torch is imported where tensors are made, so tokenizer processes stay light
    import torch
    from rich.console import Console

    from raygpt.config import DataConfig, RunSpec

FORMAT = "raygpt-shards/1"
MANIFEST = "manifest.json"
PROGRESS = "prepare-progress.json"
SPLITS = ("train", "val", "test")
DTYPE = np.dtype("<u2")
SPLIT_RULE = ("bucket = first 8 bytes of sha256(utf-8 text), big-endian, mod 1000; "
              "bucket < heldout_permille is held out: even buckets test, odd buckets val; the rest train")
HUB_SOURCES = {
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
CHINCHILLA_TOKENS_PER_PARAM = 20
_SHARD_FILE = re.compile(r"^(train|val|test)_\d{6}\.bin(\.tmp-\w+)?$")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


# ---------------------------------------------------------------------------------------------
# The manifest


def load_manifest(dataset_uri: str, storage: Storage) -> dict:
    """The manifest of a prepared dataset; a RaygptError when it is missing or malformed."""
    uri = join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise RaygptError(f"{uri}: not found: {dataset_uri} is not a prepared dataset, or its prepare did not "
                          f"finish (the manifest is written last); run `raygpt data prepare --output {dataset_uri}`")
    manifest = storage.read_json(uri)
    problem = _manifest_problem(manifest)
    if problem:
        raise RaygptError(f"{uri}: not a raygpt dataset manifest ({problem}); re-run `raygpt data prepare`")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"format {manifest.get('format')!r}, expected {FORMAT!r}"
    if manifest.get("dtype") != "uint16" or manifest.get("tokenizer") != "gpt2":
        return f"tokenizer/dtype {manifest.get('tokenizer')!r}/{manifest.get('dtype')!r}, expected 'gpt2'/'uint16'"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        return f"splits must hold {', '.join(SPLITS)}"
    for split in SPLITS:
        shards = splits[split].get("shards") if isinstance(splits[split], dict) else None
        if not isinstance(shards, list):
            return f"splits.{split}.shards is missing"
        for shard in shards:
            if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                    and isinstance(shard.get("tokens"), int) and isinstance(shard.get("sha256"), str)):
                return f"splits.{split}.shards: every shard needs name, tokens and sha256"
    return None


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON: names a dataset exactly in run records and caches."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def chinchilla_tokens(preset: str) -> int:
    """Chinchilla-optimal training tokens for a model preset: 20 per parameter
    (gpt2-small, untied: 20 x 163,009,536 = 3,260,190,720)."""
    import torch

    from raygpt.model import GPT, PRESETS

    if preset not in PRESETS:
        raise RaygptError(f"data.chinchilla: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    with torch.device("meta"):  # counts parameters without allocating them
        return CHINCHILLA_TOKENS_PER_PARAM * GPT(PRESETS[preset]).num_params()


# ---------------------------------------------------------------------------------------------
# Sources: a deterministic stream of document texts


@dataclass
class Source:
    name: str
    """As given in ``data.source``."""
    description: str
    """What the documents are, for the output and the manifest."""
    documents: Callable[[], Iterator[str]]
    """Yields the documents in a fixed order."""
    revision: str | None = None
    """The hub dataset's commit that is streamed (pinned, so a resumed run reads the same data)."""


def open_source(data: DataConfig) -> Source:
    """Resolve ``data.source``; fails early, with one message, on a missing path or an unreachable hub."""
    source = data.source
    if source in HUB_SOURCES:
        repo, config = HUB_SOURCES[source]
        revision = _hub_revision(source, repo)
        return Source(source, f"{repo} ({config}) at revision {revision[:12]}, streamed from the Hugging Face hub",
                      lambda: _hub_documents(repo, config, revision, data.text_column), revision)
    if source == "stdlib":
        return Source(source, f"docstrings of the Python {platform.python_version()} standard library "
                              "(an offline corpus that every Python installation carries, not web text)",
                      _stdlib_documents)
    files = _local_files(source)
    kinds = ", ".join(sorted({f.suffix for f in files}))
    return Source(source, f"{len(files)} local file(s) ({kinds})",
                  lambda: _local_documents(files, data.text_column, data.txt_documents))


def _hub_revision(source: str, repo: str) -> str:
    """The dataset's current commit, from one quick metadata request: an offline machine fails
    here in a second, not after minutes of ``datasets``' retries."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, timeout=10).sha
    except Exception as e:  # huggingface_hub raises httpx, OSError and its own errors alike
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise RaygptError(f"data.source {source}: cannot reach {repo} on the Hugging Face hub "
                          f"({type(e).__name__}: {detail}); check the network, HF_ENDPOINT and HF_HUB_OFFLINE, "
                          "or use --source stdlib or a local path") from None


def _hub_documents(repo: str, config: str, revision: str, column: str) -> Iterator[str]:
    from datasets import load_dataset

    count = 0
    try:
        rows = iter(load_dataset(repo, name=config, split="train", streaming=True, revision=revision))
        for row in rows:
            if column not in row:
                raise RaygptError(f"{repo}: rows have no {column!r} column (columns: {', '.join(row)}); "
                                  "set data.text_column")
            yield row[column]
            count += 1
    except (RaygptError, KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as e:
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise RaygptError(f"{repo}: streaming stopped after {count:,} documents ({type(e).__name__}: {detail}); "
                          "re-run the same command to resume: finished shards are kept") from None


def _local_files(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True)) if Path(p).is_file()]
        files = [f for f in files if f.suffix in LOCAL_SUFFIXES]
        if not files:
            raise RaygptError(f"data.source: the glob {source!r} matches no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise RaygptError(f"data.source: the directory {source!r} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise RaygptError(f"data.source: {source!r} is not a {'/'.join(LOCAL_SUFFIXES)} file")
        return [path]
    raise RaygptError(f"data.source: {source!r} is neither {', '.join(HUB_SOURCES)}, stdlib, "
                      "nor an existing file, directory or glob")


def _local_documents(files: list[Path], column: str, txt_documents: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise RaygptError(f"{path}: not UTF-8 text (byte {e.start})") from None
            if txt_documents == "paragraphs":
                yield from (block.strip() for block in re.split(r"\n[ \t]*\n", text))
            else:
                yield text
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, column)
        else:
            yield from _parquet_documents(path, column)


def _jsonl_documents(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RaygptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or column not in row:
                raise RaygptError(f"{path}:{lineno}: no {column!r} key; set data.text_column")
            if row[column] is not None:
                yield row[column]


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise RaygptError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    if column not in parquet.schema_arrow.names:
        raise RaygptError(f"{path}: no {column!r} column (columns: {', '.join(parquet.schema_arrow.names)}); "
                          "set data.text_column")
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        yield from (text for text in batch.column(0).to_pylist() if text is not None)


def _stdlib_documents() -> Iterator[str]:
    """One document per standard-library module: its dotted name, then its docstrings in source order.

    The sources are parsed with ``ast``, never imported, so nothing runs and nothing is
    platform-dependent. Test suites are left out (few docstrings, slow to parse).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped_dirs = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skipped_dirs]  # site-packages can be huge
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately broken (bad encodings, py2)
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        nodes.sort(key=lambda n: (n.lineno, n.col_offset))
        docstrings = [d for d in (ast.get_docstring(n) for n in [tree, *nodes]) if d]
        if docstrings:
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            yield "\n\n".join([module, *docstrings])


# ---------------------------------------------------------------------------------------------
# The split rule


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


# ---------------------------------------------------------------------------------------------
# Tokenization: chunks of documents in worker processes, results consumed in order


# A chunk is big enough to amortize inter-process transfer, small enough that the pipeline
# has several in flight per process.
CHUNK_DOCS = 256
CHUNK_CHARS = 4 << 20


@dataclass
class _Chunk:
    texts: list[str]
    splits: list[str]


def _tokenize_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens, each followed by EOT, as one flat array plus per-document lengths."""
    from raygpt.tokenizer import get_tokenizer

    # encode_ordinary: '<|endoftext|>' written inside a document is text, not a separator.
    encoding = get_tokenizer()
    ids = [encoding.encode_ordinary(text) for text in texts]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=DTYPE)
    end = 0
    for doc in ids:
        flat[end:end + len(doc)] = doc
        end += len(doc)
        flat[end] = EOT_ID
        end += 1
    return flat, lengths


def _tokenized(chunks: Iterator[_Chunk], num_proc: int) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
    """Tokenize chunks with ``num_proc`` processes; yields in input order, so the output bytes
    do not depend on the number of processes."""
    if num_proc <= 1:
        for chunk in chunks:
            yield chunk, *_tokenize_texts(chunk.texts)
        return
    # spawn, not fork: the parent may hold pyarrow/S3 threads that a forked child would inherit mid-lock.
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"))
    in_flight: deque[tuple[_Chunk, Future]] = deque()
    try:
        for chunk in chunks:
            in_flight.append((chunk, pool.submit(_tokenize_texts, chunk.texts)))
            if len(in_flight) >= 2 * num_proc:
                chunk, future = in_flight.popleft()
                yield chunk, *future.result()
        while in_flight:
            chunk, future = in_flight.popleft()
            yield chunk, *future.result()
    except BrokenProcessPool:
        raise RaygptError("a tokenizer process died (out of memory? its error, if any, is above); "
                          "lower data.num_proc and re-run: finished shards are kept") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Writing shards: atomic, in the background, skipping identical ones already stored


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
            if name == MANIFEST and not _manifest_problem(record):
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
        return is_remote(uri) or _sha256_file(Path(self.storage.resolve(uri)[1])) == shard["sha256"]

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


# ---------------------------------------------------------------------------------------------
# prepare


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
    num_proc = data.num_proc or os.cpu_count() or 1
    if console is not None:
        console.print(f"[bold]source[/]: {data.source}: {source.description}")
        budget_text = f"{train_budget:,} train tokens" if train_budget is not None else "the whole source for training"
        console.print(f"[bold]budget[/]: {budget_text}"
                      + (f" (Chinchilla, 20 x params of {data.chinchilla})" if data.chinchilla else "")
                      + f", {data.val_tokens:,} val, {data.test_tokens:,} test; {num_proc} tokenizer process(es)")

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
        with _progress_bar(console, total) as advance, closing(_tokenized(chunks(), num_proc)) as tokenized:
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


def prepare_command(args) -> int:
    """``raygpt data prepare [SPEC] [--source S] [--output URI] [--tokens N | --chinchilla PRESET]``."""
    from rich.console import Console

    from raygpt.config import load_spec

    # The flags are overrides like any --set, so load_spec checks them and names the spec file.
    flags = list(args.overrides)
    if args.source:
        flags.append(f"data.source={args.source}")
    if args.output:
        flags.append(f"data.output={args.output}")
    if args.tokens is not None:
        flags += [f"data.tokens={args.tokens}", "data.chinchilla=null"]
    if args.chinchilla:
        flags += ["data.tokens=null", f"data.chinchilla={args.chinchilla}"]
    if args.num_proc is not None:
        flags.append(f"data.num_proc={args.num_proc}")
    spec = load_spec(args.spec, flags)
    prepare(spec, Storage.from_config(spec.storage), console=Console())
    return 0


# ---------------------------------------------------------------------------------------------
# Reading shards: a node-local cache, memory-mapped


def default_cache_root() -> Path:
    return Path(os.environ.get("RAYGPT_CACHE_DIR") or Path.home() / ".cache" / "raygpt" / "shards")


class ShardCache:
    """Shards of one dataset as memory-mapped uint16 arrays.

    Shards in ``s3://`` are downloaded on first use into ``<cache_dir>/<manifest hash>/`` (default
    root ``$RAYGPT_CACHE_DIR``, else ``~/.cache/raygpt/shards``), under a file lock so the workers
    of one node download each shard once, and checked against the manifest's sha256 before they
    are used. Local datasets are mapped in place, checked once per process.
    ``max_cached_shards`` bounds the downloaded files kept on disk (least recently used go first);
    None keeps them all, which makes restarts on the same node free.
    """

    def __init__(self, dataset_uri: str, storage: Storage, cache_dir: str | Path | None = None,
                 max_cached_shards: int | None = None):
        self.dataset_uri, self.storage = dataset_uri, storage
        self.manifest = load_manifest(dataset_uri, storage)
        self.manifest_sha256 = manifest_hash(self.manifest)
        self.cache_dir = Path(cache_dir or default_cache_root()) / self.manifest_sha256[:16]
        self.max_cached_shards = max_cached_shards
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._verified: set[Path] = set()
        self._lock = threading.Lock()

    def shards(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise RaygptError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        return self.manifest["splits"][split]["shards"]

    def tokens(self, split: str, shard_index: int) -> np.ndarray:
        """The shard's tokens, memory-mapped (read-only uint16)."""
        key = (split, shard_index)
        with self._lock:
            if key in self._maps:
                return self._maps[key]
        path = self.local_path(split, shard_index)
        tokens = self.shards(split)[shard_index]["tokens"]
        array = np.memmap(path, dtype=DTYPE, mode="r", shape=(tokens,)) if tokens else np.empty(0, DTYPE)
        with self._lock:
            self._maps[key] = array
        return array

    def local_path(self, split: str, shard_index: int) -> Path:
        """A verified local file holding the shard (downloading it when the dataset is remote)."""
        shard = self.shards(split)[shard_index]
        uri = join(self.dataset_uri, shard["name"])
        if not is_remote(self.dataset_uri):
            path = Path(self.storage.resolve(uri)[1])
            with self._lock:
                verified = path in self._verified
            if not verified:
                if not path.is_file():
                    raise RaygptError(f"{uri}: shard missing (listed in {MANIFEST}); re-run `raygpt data prepare`")
                _check_shard(uri, path, shard)
                with self._lock:
                    self._verified.add(path)
            return path
        path = self.cache_dir / shard["name"]
        if not _cached(path, shard):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.cache_dir / f".{shard['name']}.lock"):
                if not _cached(path, shard):
                    self._download(uri, path, shard)
            self._evict(keep=path.name)
        try:
            os.utime(path)  # recency, for eviction
        except FileNotFoundError:  # evicted by another worker on this node just now
            return self.local_path(split, shard_index)
        return path

    def _download(self, uri: str, path: Path, shard: dict) -> None:
        if not self.storage.exists(uri):
            raise RaygptError(f"{uri}: shard missing (listed in {MANIFEST}); re-run `raygpt data prepare`")
        tmp = path.with_name(f".{path.name}.download-{uuid.uuid4().hex[:8]}")
        try:
            self.storage.download(uri, tmp)
            _check_shard(uri, tmp, shard)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def release(self, keep: set[tuple[str, int]]) -> None:
        """Unmap every shard but ``keep`` (the OS pages a mapped shard in and out as needed; this
        bounds the address space and lets evicted files go)."""
        with self._lock:
            for key in [k for k in self._maps if k not in keep]:
                del self._maps[key]

    def _evict(self, keep: str) -> None:
        if self.max_cached_shards is None:
            return
        with self._lock:
            in_use = {self.shards(split)[i]["name"] for split, i in self._maps} | {keep}
        # Other workers on this node (and our prefetch thread) evict too: a file may vanish
        # between the listing and its stat.
        stamped = []
        for path in self.cache_dir.glob("*.bin"):
            with contextlib.suppress(FileNotFoundError):
                stamped.append((path.stat().st_mtime, path))
        files = [path for _, path in sorted(stamped)]
        for path in files[:max(0, len(files) - self.max_cached_shards)]:
            if path.name not in in_use:
                path.unlink(missing_ok=True)  # another process's mapping of it stays valid


def _cached(path: Path, shard: dict) -> bool:
    return path.is_file() and path.stat().st_size == DTYPE.itemsize * shard["tokens"]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_shard(uri: str, path: Path, shard: dict) -> None:
    digest = _sha256_file(path)
    if digest != shard["sha256"]:
        raise RaygptError(f"{uri}: sha256 mismatch (corrupt shard): expected {shard['sha256'][:16]}..., "
                          f"got {digest[:16]}...; re-run `raygpt data prepare` to rewrite it")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Training batches: a deterministic function of (seed, step)

# Stream tags keep the shard-order and sequence-order generators independent.
_SHARD_ORDER, _SEQUENCE_ORDER = 0, 1


class TrainBatches:
    """Global batch ``step`` of the train split, and each worker's share of it.

    A sequence is a window of ``seq_len + 1`` tokens at stride ``seq_len`` within one shard
    (x = tokens[i*T : i*T+T], y = tokens[i*T+1 : i*T+T+1]). Epoch ``e``'s order: the shards
    permuted by a generator seeded with (seed, e), each shard's sequences permuted by one seeded
    with (seed, e, shard), concatenated. Global batch ``step`` is positions
    [k*G, (k+1)*G) of epoch ``step // steps_per_epoch``'s order, k = step % steps_per_epoch; the
    tail of an epoch too short for a whole global batch is skipped. NumPy's PCG64 generators make
    the order the same on every machine and Python version.
    """

    def __init__(self, dataset_uri: str, storage: Storage, seq_len: int, seed: int, global_batch_size: int,
                 cache_dir: str | Path | None = None, max_cached_shards: int | None = None):
        if seq_len < 1 or global_batch_size < 1 or seed < 0:
            raise RaygptError(f"TrainBatches: seq_len ({seq_len}) and global_batch_size ({global_batch_size}) "
                              f"must be positive and seed ({seed}) non-negative")
        self.cache = ShardCache(dataset_uri, storage, cache_dir, max_cached_shards)
        self.seq_len, self.seed, self.global_batch_size = seq_len, seed, global_batch_size
        shards = self.cache.shards("train")
        self.shard_sequences = np.array([max(0, (s["tokens"] - 1) // seq_len) for s in shards], dtype=np.int64)
        self.sequences_per_epoch = int(self.shard_sequences.sum())
        self.steps_per_epoch = self.sequences_per_epoch // global_batch_size
        if self.steps_per_epoch == 0:
            raise RaygptError(f"{dataset_uri}: the train split holds {self.sequences_per_epoch:,} sequences of "
                              f"{seq_len + 1} tokens, fewer than one global batch of {global_batch_size}: prepare "
                              "more tokens, or lower train.global_batch_tokens or the sequence length")
        self._epoch_orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._sequence_orders: dict[tuple[int, int], np.ndarray] = {}
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="raygpt-prefetch")
        self._prefetching: dict[int, Future] = {}

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start position of each shard in that order) for one epoch."""
        if epoch not in self._epoch_orders:
            order = self._shard_order(epoch)
            starts = np.concatenate([[0], np.cumsum(self.shard_sequences[order])])
            self._epoch_orders = {epoch: (order, starts)}  # one epoch at a time is all a step needs
        return self._epoch_orders[epoch]

    def _shard_order(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _SHARD_ORDER, epoch])))
        return rng.permutation(len(self.shard_sequences))

    def _sequence_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._sequence_orders:
            rng = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence([self.seed, _SEQUENCE_ORDER, epoch, shard])))
            if len(self._sequence_orders) >= 4:
                self._sequence_orders.pop(next(iter(self._sequence_orders)))
            self._sequence_orders[key] = rng.permutation(int(self.shard_sequences[shard]))
        return self._sequence_orders[key]

    def sequence_ids(self, step: int, start: int = 0, count: int | None = None) -> np.ndarray:
        """(shard, sequence) pairs, shape (count, 2), at positions [start, start+count) of global batch ``step``."""
        if step < 0:
            raise RaygptError(f"step {step}: must be non-negative")
        count = self.global_batch_size - start if count is None else count
        epoch, k = divmod(step, self.steps_per_epoch)
        order, starts = self._epoch_order(epoch)
        ids = np.empty((count, 2), dtype=np.int64)
        position, filled = k * self.global_batch_size + start, 0
        while filled < count:
            slot = int(np.searchsorted(starts, position, side="right")) - 1
            shard = int(order[slot])
            n = min(count - filled, int(starts[slot + 1]) - position)
            local = position - int(starts[slot])
            ids[filled:filled + n, 0] = shard
            ids[filled:filled + n, 1] = self._sequence_order(epoch, shard)[local:local + n]
            filled, position = filled + n, position + n
        return ids

    def micro_batches(self, step: int, rank: int, world_size: int,
                      micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Worker ``rank``'s contiguous slice of global batch ``step``, as ``accum`` micro-batches
        of (x, y), int64, shape (micro_batch_size, seq_len)."""
        import torch

        if not 0 <= rank < world_size:
            raise RaygptError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1 or self.global_batch_size % (world_size * micro_batch_size):
            raise RaygptError(f"a global batch of {self.global_batch_size} sequences does not split into "
                              f"{world_size} worker(s) x micro batches of {micro_batch_size}: make "
                              f"train.global_batch_tokens / seq_len a multiple of {world_size * micro_batch_size}")
        per_worker = self.global_batch_size // world_size
        ids = self.sequence_ids(step, rank * per_worker, per_worker)
        T = self.seq_len
        rows = np.empty((per_worker, T + 1), dtype=np.int64)
        for row, (shard, sequence) in enumerate(ids):
            rows[row] = self.cache.tokens("train", int(shard))[sequence * T:sequence * T + T + 1]
        self.cache.release({("train", int(s)) for s in np.unique(ids[:, 0])})
        self._prefetch_after(step, int(ids[-1, 0]))
        xy = torch.from_numpy(rows)
        return [(xy[i:i + micro_batch_size, :-1].contiguous(), xy[i:i + micro_batch_size, 1:].contiguous())
                for i in range(0, per_worker, micro_batch_size)]

    def _prefetch_after(self, step: int, shard: int) -> None:
        """Start downloading the shard that follows ``shard`` in the epoch order (or the next epoch's first)."""
        epoch = self.epoch_of(step)
        order, _ = self._epoch_order(epoch)
        slot = int(np.flatnonzero(order == shard)[0])
        # Not _epoch_order(epoch + 1): it keeps one epoch, and the next step needs this one's.
        following = int(order[slot + 1] if slot + 1 < len(order) else self._shard_order(epoch + 1)[0])
        done = [i for i, f in self._prefetching.items() if f.done()]
        for i in done:
            del self._prefetching[i]  # a failed prefetch is retried, and reported, by the step that needs it
        if following not in self._prefetching:
            self._prefetching[following] = self._prefetcher.submit(self.cache.local_path, "train", following)

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TrainBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Evaluation batches: fixed non-overlapping windows


def count_eval_windows(manifest: dict, split: str, seq_len: int, max_tokens: int | None = None,
                       rank: int = 0, world_size: int = 1) -> int:
    """Windows of ``seq_len`` predicted tokens that ``eval_batches`` gives worker ``rank``
    (all workers: world_size=1). Evaluators weight per-worker mean losses by it."""
    if split not in SPLITS:
        raise RaygptError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    total = manifest["splits"][split]["tokens"]
    usable = total if max_tokens is None else min(total, max_tokens)
    windows = max(0, (usable - 1) // seq_len)
    return len(range(rank, windows, world_size))


def eval_batches(dataset_uri: str, storage: Storage, split: str, seq_len: int, batch_size: int,
                 max_tokens: int | None = None, rank: int = 0, world_size: int = 1,
                 cache_dir: str | Path | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over the first ``max_tokens`` tokens of ``split``, read as one stream.

    Window i is x = tokens[i*T : i*T+T], y = tokens[i*T+1 : i*T+T+1]: every token after the
    first is predicted exactly once. Worker ``rank`` gets windows rank, rank + world_size, ...;
    the last batch may be smaller.
    """
    cache = ShardCache(dataset_uri, storage, cache_dir)
    windows = count_eval_windows(cache.manifest, split, seq_len, max_tokens)
    if windows == 0:
        raise RaygptError(f"{dataset_uri}: the {split} split has {cache.manifest['splits'][split]['tokens']:,} tokens, "
                          f"fewer than one window of {seq_len + 1}; prepare more {split} tokens")
    return _eval_batches(cache, split, seq_len, batch_size, range(rank, windows, world_size))


def _eval_batches(cache: ShardCache, split: str, seq_len: int, batch_size: int,
                  windows: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    import torch

    shards = cache.shards(split)
    starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])]).tolist()

    def span(begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the split's stream, across shard boundaries."""
        pieces, slot = [], bisect.bisect_right(starts, begin) - 1
        while begin < end:
            stop = min(end, starts[slot + 1])
            pieces.append(cache.tokens(split, slot)[begin - starts[slot]:stop - starts[slot]])
            cache.release({(split, slot), (split, slot + 1)})
            begin, slot = stop, slot + 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    T = seq_len
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        rows = torch.from_numpy(np.stack([span(i * T, i * T + T + 1) for i in batch]).astype(np.int64))
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
