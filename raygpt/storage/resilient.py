"""A pyarrow filesystem that rides out a store outage, for what Ray Train writes itself.

Ray Train uploads checkpoints (a worker's upload thread) and its controller's checkpoint
snapshot through the filesystem given as ``RunConfig(storage_filesystem=...)``; raygpt gives
it ``retrying_filesystem(s3, policy)``: a ``pyarrow.fs.PyFileSystem`` whose handler passes
every operation to the S3 filesystem and retries it on a transient error (``storage.retry``).

Output streams are spooled (in memory up to 64 MiB, then to a temporary file) and uploaded
whole on ``close``, so a retry rewrites the whole object: an object in the store is complete
or absent, never half written. Input streams are likewise read whole, under retry, before
the first byte is handed out. Random-access files (``open_input_file``) retry the opening only.
The handler holds the S3 filesystem (no credentials: they come from each process's own
environment) and the policy, so it pickles into Ray's workers and controller.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs

from raygpt.storage.retry import RetryPolicy, is_transient

SPOOL_IN_MEMORY = 64 * 2**20
CHUNK = 8 * 2**20


def retrying_filesystem(inner: pafs.FileSystem, policy: RetryPolicy) -> pafs.PyFileSystem:
    return pafs.PyFileSystem(RetryingHandler(inner, policy))


class RetryingHandler(pafs.FileSystemHandler):
    def __init__(self, inner: pafs.FileSystem, policy: RetryPolicy):
        self.inner, self.policy = inner, policy

    def __eq__(self, other: Any) -> bool:
        # Ray Train compares a checkpoint's filesystem with the run's (``is_managed_checkpoint``).
        return isinstance(other, RetryingHandler) and self.policy == other.policy and self.inner.equals(other.inner)

    def __ne__(self, other: Any) -> bool:
        return not self == other

    def _retried(self, what: str, path: str, operation: Callable[[], Any]) -> Any:
        return self.policy.call(operation, f"{what} {path}")

    def get_type_name(self) -> str:
        return f"retrying+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retried("check", ", ".join(paths[:3]), lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retried("list", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retried("create", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._delete(path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retried("delete", path, lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the whole bucket root through raygpt's Ray Train filesystem")

    def delete_file(self, path: str) -> None:
        self._delete(path, lambda: self.inner.delete_file(path))

    def _delete(self, path: str, delete: Callable[[], None]) -> None:
        """A deletion retried after a transient error may find its work done: that is success."""
        failed = [False]

        def attempt() -> None:
            try:
                delete()
            except FileNotFoundError:
                if not failed[0]:
                    raise
            except OSError as e:
                failed[0] = failed[0] or is_transient(e)
                raise

        self._retried("delete", path, attempt)

    def move(self, src: str, dest: str) -> None:
        self._retried("move", src, lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retried("copy", src, lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)

        def download() -> None:
            spool.seek(0)
            spool.truncate()
            with self.inner.open_input_stream(path) as source:
                while chunk := source.read(CHUNK):
                    spool.write(chunk)

        try:
            self._retried("read", path, download)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return pa.PythonFile(spool, mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._retried("open", path, lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        return pa.PythonFile(WholeObjectUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: dict[str, str] | None = None) -> pa.NativeFile:
        raise OSError(f"{path}: an object store cannot append")


class WholeObjectUpload:
    """A write-only file: spooled while written, uploaded whole (under retry) on ``close``."""

    def __init__(self, handler: RetryingHandler, path: str, metadata: dict[str, str] | None):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        return self.spool.write(data)

    def tell(self) -> int:
        return self.spool.tell()

    def flush(self) -> None:
        """Nothing reaches the store before ``close``: an object is written whole or not at all."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler._retried("write", self.path, self._upload)
        finally:
            self.spool.close()

    def _upload(self) -> None:
        self.spool.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as target:
            shutil.copyfileobj(self.spool, target, CHUNK)
