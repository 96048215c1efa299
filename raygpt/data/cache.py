"""A node's local copy of a dataset's shards, memory-mapped, verified, and bounded in size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from raygpt.data.manifest import DTYPE, MANIFEST, SPLITS, check_shard, load_manifest, manifest_hash
from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join


def default_cache_root() -> Path:
    return Path(os.environ.get("RAYGPT_CACHE_DIR") or Path.home() / ".cache" / "raygpt" / "shards")


class ShardCache:
    """Shards of one dataset as memory-mapped uint16 arrays.

    Shards in ``s3://`` are downloaded on first use into ``<cache_dir>/<manifest hash>/`` (default
    root ``$RAYGPT_CACHE_DIR``, else ``~/.cache/raygpt/shards``), under a file lock so the workers
    of one node download each shard once, and checked against the manifest's sha256 before they
    are used. Local datasets are mapped in place, checked once per process.
    ``max_cached_shards`` bounds the downloaded files kept on disk (least recently used go first);
    None keeps them all, which makes restarts on the same node free. Eviction never removes a
    shard that a live process on the node has mapped or just fetched: each process lists its
    shards in ``.in-use-<pid>`` in the cache folder, rewritten when the list changes.
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
        self._fetched: str | None = None  # the newest download: about to be mapped, so in use
        self._listed: frozenset[str] = frozenset()

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
        self._list_in_use()
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
                check_shard(uri, path, shard)
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
            check_shard(uri, tmp, shard)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def release(self, keep: set[tuple[str, int]]) -> None:
        """Unmap every shard but ``keep`` (the OS pages a mapped shard in and out as needed; this
        bounds the address space and lets evicted files go)."""
        with self._lock:
            for key in [k for k in self._maps if k not in keep]:
                del self._maps[key]
        self._list_in_use()

    def _in_use_here(self) -> frozenset[str]:
        with self._lock:
            names = {self.shards(split)[i]["name"] for split, i in self._maps}
        return frozenset(names | ({self._fetched} if self._fetched else set()))

    def _list_in_use(self) -> None:
        """Rewrite this process's ``.in-use-<pid>`` when its shards changed (remote datasets only)."""
        if self.max_cached_shards is None or not is_remote(self.dataset_uri):
            return
        names = self._in_use_here()
        if names == self._listed:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f".in-use-{os.getpid()}"
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")  # the prefetch thread writes it too
        tmp.write_text("\n".join(sorted(names)))
        os.replace(tmp, path)
        self._listed = names

    def _in_use_on_node(self) -> set[str]:
        """Shards listed by every live process on this node (a dead process's list is removed)."""
        names = set(self._in_use_here())
        for listing in self.cache_dir.glob(".in-use-*"):
            pid = listing.name.removeprefix(".in-use-")
            if not pid.isdigit():
                continue
            if int(pid) == os.getpid():
                continue  # this process's own shards: _in_use_here has them as they are now
            if not _alive(int(pid)):
                listing.unlink(missing_ok=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                names.update(line for line in listing.read_text().splitlines() if line)
        return names

    def _evict(self, keep: str) -> None:
        if self.max_cached_shards is None:
            return
        self._fetched = keep
        self._list_in_use()
        in_use = self._in_use_on_node() | {keep}
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _cached(path: Path, shard: dict) -> bool:
    return path.is_file() and path.stat().st_size == DTYPE.itemsize * shard["tokens"]


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
