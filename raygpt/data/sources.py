"""Sources: the corpora ``data.source`` names, each a deterministic stream of document texts.

FineWeb and FineWeb-Edu (sample-10BT) stream from the Hugging Face hub at a pinned revision;
local files are .txt (one document, or one per blank-line-separated block with
``data.txt_documents: paragraphs``), .jsonl or .parquet; ``stdlib`` is the standard library's
docstrings, an offline corpus every Python installation carries.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from raygpt.errors import RaygptError

if TYPE_CHECKING:  # torch is imported where tensors are made, so data preparation never loads it

    from raygpt.config import DataConfig


HUB_SOURCES = {
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}


LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


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
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError as e:
                raise RaygptError(f"{path}:{lineno}: not UTF-8 text (byte {line[e.start]:#04x})") from None
            except json.JSONDecodeError as e:
                raise RaygptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or column not in row:
                raise RaygptError(f"{path}:{lineno}: no {column!r} key; set data.text_column")
            text = row[column]
            if text is not None and not isinstance(text, str):
                raise RaygptError(f"{path}:{lineno}: {column!r} is {type(text).__name__}, not text; "
                                  "set data.text_column to the key that holds the document's text")
            if text is not None:
                yield text


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise RaygptError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    if column not in parquet.schema_arrow.names:
        raise RaygptError(f"{path}: no {column!r} column (columns: {', '.join(parquet.schema_arrow.names)}); "
                          "set data.text_column")
    kind = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise RaygptError(f"{path}: column {column!r} holds {kind}, not text; set data.text_column to the column "
                          "that holds the document's text")
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
