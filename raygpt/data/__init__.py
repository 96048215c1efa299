"""Token shards: ``raygpt data prepare`` writes them; training and evaluation read them.

- ``manifest``: what a prepared dataset is (``manifest.json``, shard names, hashes).
- ``sources``: the corpora: FineWeb and FineWeb-Edu from the hub, local txt/jsonl/parquet,
  the standard library's docstrings (offline).
- ``prepare``: the content-hash split rule, tokenization in processes, shard writing.
- ``cache``: a node-local, bounded, verified cache of downloaded shards.
- ``batches``: training batches as a function of (seed, step), and evaluation windows.
"""
