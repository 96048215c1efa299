"""Batches: training batches as a function of (seed, step), and fixed evaluation windows.

Training reads with ``TrainBatches``: a hierarchical shuffle that depends on (seed, step)
only. Each epoch permutes the train shards, then the sequences within each shard; global
batch ``step`` is the next ``global_batch_size`` sequences of that order, and worker ``r`` of
``W`` takes the r-th contiguous slice. The same run on 2 or 4 workers therefore sees the same
samples at every step, and a run can resume on a different number of workers. Each worker
only needs one or two shards at a time, cached on the node and prefetched in the background.
"""

from __future__ import annotations

import bisect
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from raygpt.data.cache import ShardCache
from raygpt.data.manifest import SPLITS
from raygpt.errors import RaygptError
from raygpt.storage import Storage

if TYPE_CHECKING:  # torch is imported where tensors are made, so data preparation never loads it
    import torch



# Stream tags keep the shard-order and sequence-order generators independent.
_SHARD_ORDER, _SEQUENCE_ORDER = 0, 1


def micro_batch_share(micro_batches: int, rank: int, world_size: int) -> range:
    """The global micro-batch indices worker ``rank`` of ``world_size`` computes: a contiguous
    share, the first ``micro_batches % world_size`` workers taking one more than the rest, so
    any worker count splits a global batch (shares differ by at most one micro-batch)."""
    base, extra = divmod(micro_batches, world_size)
    first = rank * base + min(rank, extra)
    return range(first, first + base + (rank < extra))


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
        self.shard_sequences = shard_sequences(shards, seq_len)
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

    def rows(self, step: int, rank: int, world_size: int, micro_batch_size: int,
             out: np.ndarray | None = None) -> np.ndarray:
        """Worker ``rank``'s contiguous share of global batch ``step`` (``micro_batch_share``): uint16 tokens, shape
        (sequences, seq_len + 1), each row a sequence and its next token. Filled into ``out``
        when given (a reused, possibly pinned, host buffer of that shape)."""
        if not 0 <= rank < world_size:
            raise RaygptError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1 or self.global_batch_size % micro_batch_size:
            raise RaygptError(f"a global batch of {self.global_batch_size} sequences does not split into micro "
                              f"batches of {micro_batch_size}: make train.global_batch_tokens / seq_len a multiple "
                              f"of {max(micro_batch_size, 1)}")
        share = micro_batch_share(self.global_batch_size // micro_batch_size, rank, world_size)
        if not share:
            raise RaygptError(f"a global batch of {self.global_batch_size // micro_batch_size} micro batches leaves "
                              f"worker {rank} of {world_size} none: use fewer workers or smaller micro batches")
        per_worker = len(share) * micro_batch_size
        ids = self.sequence_ids(step, share.start * micro_batch_size, per_worker)
        T = self.seq_len
        rows = np.empty((per_worker, T + 1), dtype=np.uint16) if out is None else out
        if rows.shape != (per_worker, T + 1) or rows.dtype != np.uint16:
            raise ValueError(f"out: expected uint16 of shape {(per_worker, T + 1)}, got {rows.dtype} {rows.shape}")
        for row, (shard, sequence) in enumerate(ids):
            rows[row] = self.cache.tokens("train", int(shard))[sequence * T:sequence * T + T + 1]
        self.cache.release({("train", int(s)) for s in np.unique(ids[:, 0])})
        self._prefetch_after(step, int(ids[-1, 0]))
        return rows

    def micro_batches(self, step: int, rank: int, world_size: int,
                      micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``rows`` as ``accum`` micro-batches of (x, y), int64 on the CPU, shape
        (micro_batch_size, seq_len). Training moves ``rows`` to the device instead
        (``raygpt.train.step.DeviceBatches``); this is the reference it must equal."""
        import torch

        xy = torch.from_numpy(self.rows(step, rank, world_size, micro_batch_size).astype(np.int64))
        return [(xy[i:i + micro_batch_size, :-1].contiguous(), xy[i:i + micro_batch_size, 1:].contiguous())
                for i in range(0, len(xy), micro_batch_size)]

    def share_digest(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> int:
        """A 40-bit hash per sequence of worker ``rank``'s share of global batch ``step``, summed.

        Summed over all workers it is the same for any worker count (below 2**53, so exact in
        float64): a record of which sequences made up a step that a resumed or resized run can
        be checked against.
        """
        share = micro_batch_share(self.global_batch_size // micro_batch_size, rank, world_size)
        ids = self.sequence_ids(step, share.start * micro_batch_size, len(share) * micro_batch_size)
        mixed = (ids[:, 0].astype(np.uint64) << np.uint64(32)) ^ ids[:, 1].astype(np.uint64)
        mixed = (mixed * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(24)  # splitmix's multiplier: spreads the bits
        return int(mixed.sum(dtype=np.uint64))

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


def shard_sequences(shards: list[dict], seq_len: int) -> np.ndarray:
    """Training sequences (``seq_len`` + 1 tokens each) in each shard of a manifest's split:
    what ``TrainBatches`` draws from, counted the same way by the driver before Ray starts."""
    return np.array([max(0, (s["tokens"] - 1) // seq_len) for s in shards], dtype=np.int64)


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
