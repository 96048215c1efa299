"""A prepared dataset: a folder of token shards and the ``manifest.json`` that describes them.

A prepared dataset is a folder (local or ``s3://``) of ``{split}_{index:06d}.bin`` files of raw
little-endian uint16 GPT-2 tokens, each document followed by ``<|endoftext|>``, plus
``manifest.json`` (token counts and sha256 per shard, tokenizer, source, split rule, budget),
written LAST: a folder without a manifest is an unfinished dataset.

When a shard's bytes are checked against its digest: ``check_dataset``, before a training
run starts, checks every shard's size, and hashes every shard of a local dataset (read in
place: one read of the disk, in parallel) or of one in S3 that holds at most
``HASH_BEFORE_START_BYTES`` (a download of seconds); a larger dataset in S3 has each shard
hashed before its first use, on each node that downloads it (``raygpt.data.cache``). Either
way a corrupt shard stops the run with one message naming it, never a step trained on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join

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
    check_shard_digest(uri, sha256_file(path), shard)


def check_shard_digest(uri: str, digest: str, shard: dict) -> None:
    if digest != shard["sha256"]:
        raise RaygptError(f"{uri}: sha256 mismatch (corrupt shard): expected {shard['sha256'][:16]}..., "
                          f"got {digest[:16]}...; re-run `raygpt data prepare` to rewrite it")


HASH_BEFORE_START_BYTES = 1 << 30
"""A dataset in S3 of at most this many bytes of shards is hashed whole before training
starts; a local one always is."""


def hashed_before_start(dataset_uri: str, manifest: dict) -> bool:
    """Whether ``check_dataset`` hashes every shard (else the workers hash each before its first use)."""
    shard_bytes = sum(split["tokens"] for split in manifest["splits"].values()) * DTYPE.itemsize
    return not is_remote(dataset_uri) or shard_bytes <= HASH_BEFORE_START_BYTES


def check_dataset(dataset_uri: str, storage: Storage) -> dict:
    """The dataset's manifest, after checking that every shard is there with its recorded size
    and, when ``hashed_before_start``, its recorded SHA-256 (several shards at a time)."""
    manifest = load_manifest(dataset_uri, storage)
    shards = [shard for split in SPLITS for shard in manifest["splits"][split]["shards"]]
    for shard in shards:
        uri = join(dataset_uri, shard["name"])
        size = storage.stored_size(uri)
        if size is None:
            raise RaygptError(f"{uri}: shard missing (listed in {join(dataset_uri, MANIFEST)}); prepare the dataset "
                              "again")
        if size != shard["tokens"] * DTYPE.itemsize:
            raise RaygptError(f"{uri}: {size} bytes, but the manifest lists {shard['tokens']} tokens "
                              f"({shard['tokens'] * DTYPE.itemsize} bytes): corrupt shard; prepare the dataset again")
    if hashed_before_start(dataset_uri, manifest):
        uris = [join(dataset_uri, shard["name"]) for shard in shards]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="raygpt-shard-hash") as pool:
            try:
                for uri, shard, digest in zip(uris, shards, pool.map(storage.sha256, uris)):
                    check_shard_digest(uri, digest, shard)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    return manifest
