"""A prepared dataset: a folder of token shards and the ``manifest.json`` that describes them.

A prepared dataset is a folder (local or ``s3://``) of ``{split}_{index:06d}.bin`` files of raw
little-endian uint16 GPT-2 tokens, each document followed by ``<|endoftext|>``, plus
``manifest.json`` (token counts and sha256 per shard, tokenizer, source, split rule, budget),
written LAST: a folder without a manifest is an unfinished dataset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raygpt.errors import RaygptError
from raygpt.storage import Storage, join

if TYPE_CHECKING:  # torch is imported where tensors are made, so tokenizer processes stay light

    pass


FORMAT = "raygpt-shards/1"


MANIFEST = "manifest.json"


SPLITS = ("train", "val", "test")


DTYPE = np.dtype("<u2")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def load_manifest(dataset_uri: str, storage: Storage) -> dict:
    """The manifest of a prepared dataset; a RaygptError when it is missing or malformed."""
    uri = join(dataset_uri, MANIFEST)
    if not storage.exists(uri):
        raise RaygptError(f"{uri}: not found: {dataset_uri} is not a prepared dataset, or its prepare did not "
                          f"finish (the manifest is written last); run `raygpt data prepare --output {dataset_uri}`")
    manifest = storage.read_json(uri)
    problem = manifest_problem(manifest)
    if problem:
        raise RaygptError(f"{uri}: not a raygpt dataset manifest ({problem}); re-run `raygpt data prepare`")
    return manifest


def manifest_problem(manifest: Any) -> str | None:
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
        listed = sum(shard["tokens"] for shard in shards)
        if splits[split].get("tokens") != listed:
            return (f"splits.{split}.tokens is {splits[split].get('tokens')!r}, but its shards hold {listed:,} "
                    "tokens")
    return None


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON: names a dataset exactly in run records and caches."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_shard(uri: str, path: Path, shard: dict) -> None:
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        raise RaygptError(f"{uri}: sha256 mismatch (corrupt shard): expected {shard['sha256'][:16]}..., "
                          f"got {digest[:16]}...; re-run `raygpt data prepare` to rewrite it")
