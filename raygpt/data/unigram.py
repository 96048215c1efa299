"""The unigram entropy of a split: the loss of a model that only counts tokens.

A model that predicts every token from the split's token frequencies alone, with no context,
has a mean loss equal to the entropy of those frequencies (in nats, like the losses). A
language model's loss below it is what it learned from context; above it, the model has not
yet learned even how often each token occurs.
"""

from __future__ import annotations

import numpy as np

from raygpt.data.manifest import DTYPE, load_manifest
from raygpt.storage import Storage, join


def unigram_entropy(dataset: str, storage: Storage, split: str = "train") -> float:
    """Entropy in nats of the token frequencies of ``split`` of a prepared dataset (shard by shard)."""
    manifest = load_manifest(dataset, storage)
    counts = np.zeros(manifest.get("vocab_size", 50257), dtype=np.int64)
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.frombuffer(storage.read_bytes(join(dataset, shard["name"]), max_bytes=None), dtype=DTYPE)
        counts += np.bincount(tokens, minlength=len(counts))[:len(counts)]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
