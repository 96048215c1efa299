"""The storage seam: local paths and ``s3://`` URIs read and written the same way.

Data shards, checkpoints, run records and results all go through ``Storage``. Local paths
are used as they are; ``s3://bucket/key`` goes to any S3-compatible endpoint (AWS, MinIO,
SeaweedFS, R2) through pyarrow, the filesystem Ray Train itself uploads checkpoints with.

Writes are atomic: an object is written under a temporary name and then moved into place,
so a reader never sees half a file. A store that stops answering is retried with backoff for
``retry_minutes`` (``storage.retry`` says what is retried; ``check_access``, the preflight,
never waits); ``ray_storage`` hands Ray Train a filesystem that retries the same way
(``storage.resilient``), so its checkpoint uploads ride out the same outage. Credentials come
from the standard AWS chain (environment, ``~/.aws``, instance profile) and never appear in
a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from raygpt.errors import RaygptError
from raygpt.storage.retry import RetryPolicy, StoreUnavailableError


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


# S3's own rule is 3-63 lowercase letters, digits, dots and hyphens; capitals and underscores
# are let through because buckets made before 2018 (and some S3-compatible servers) have them.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
# A scheme of two or more letters and a colon-slash: one letter is a Windows drive (C:/...),
# and ``openai:gpt2``, ``ift:name`` model references have no slash after the colon.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def uri_problem(uri: str, remote: bool = True, web: bool = False) -> str | None:
    """Why ``uri`` is not a place this seam can read or write, or None when it is: a local
    path, or (``remote``) ``s3://bucket/prefix``, or (``web``, for inputs fetched over HTTP)
    an ``http(s)://`` URL. Anything else that looks like a URI is refused rather than taken
    for a local folder named ``gs:`` or ``S3:``. The message starts with the URI."""
    if not isinstance(uri, str) or not uri:
        return f"{uri!r}: empty; give a local path" + (" or s3://bucket/prefix" if remote else "")
    if _CONTROL.search(uri):
        return f"{uri!r}: holds a control character (a newline, a tab or NUL)"
    if not uri.isascii() and not _is_utf8(uri):
        return f"{uri!r}: not UTF-8 text (bytes that are not UTF-8 in what was typed)"
    if uri.startswith("s3://"):
        if not remote:
            return f"{uri}: must be a local path here, not an s3:// URI"
        bucket = uri[len("s3://"):].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket):
            return (f"{uri}: {bucket!r} is not an S3 bucket name (3-63 letters, digits, '.', '-'); "
                    "expected s3://bucket/prefix")
        return None
    scheme = _SCHEME.match(uri)
    if uri[:3].lower() == "s3:":
        return f"{uri}: write S3 URIs as s3://bucket/prefix (lowercase s3, two slashes)"
    if scheme:
        if web and scheme.group(1) in ("http", "https"):
            return None
        allowed = ["a local path"] + (["s3://bucket/prefix"] if remote else []) + (["an http(s):// URL"] if web else [])
        return f"{uri}: {scheme.group(1)}:// is not supported; give {' or '.join(allowed)}"
    return None


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: what Python makes of bytes in argv that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_http_url(url: str) -> bool:
    """Whether ``url`` is ``http(s)://host[:port][/path]`` with a port that is one."""
    if not isinstance(url, str) or _CONTROL.search(url) or not _is_utf8(url):
        return False
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is no number or above 65535, a bracket left open
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port_ok


def endpoint_problem(url: str) -> str | None:
    """Why ``url`` is not an S3 endpoint (``http(s)://host[:port]``), or None when it is one."""
    if not is_http_url(url):
        shown = without_userinfo(url) if isinstance(url, str) else url
        return f"{shown!r} is not an S3 endpoint; expected http(s)://host[:port], e.g. http://127.0.0.1:8333"
    if "@" in urlsplit(url).netloc:  # S3 signs requests with keys; a URL's user:password would only be recorded
        return (f"{without_userinfo(url)!r} carries a user:password: S3 credentials come from AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or ~/.aws, an instance profile), never from the endpoint's URL")
    return None


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def without_userinfo(text: str | None) -> str | None:
    """``http://user:secret@host:9000/v1`` -> ``http://host:9000/v1``: a URL may carry
    credentials. Every URL in ``text`` is cut, so a message that quotes one can be shown."""
    return _USERINFO.sub(r"\1", text) if text and "@" in text else text


def without_credentials(value: Any) -> Any:
    """``value`` (a spec as a dict, a list, a string) with the user:password of every URL in
    it removed: what a run record, a checkpoint, a model card or a tracker may keep."""
    if isinstance(value, dict):
        return {key: without_credentials(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_credentials(item) for item in value]
    return without_userinfo(value) if isinstance(value, str) else value


SMALL_FILE_BYTES = 64 << 20
"""What ``read_bytes``, ``read_text`` and ``read_json`` read at most unless told otherwise:
manifests, run records, answers files and metrics are far smaller."""


def utf8_text(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8; bytes that are not are one RaygptError naming ``where`` and the place."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RaygptError(f"{where}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
                          f"{e.start})") from None


def check_uri(uri: str) -> None:
    """A RaygptError when ``uri`` is neither a local path nor ``s3://bucket/...``."""
    problem = uri_problem(uri)
    if problem:
        raise RaygptError(problem)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class Storage:
    """Reads and writes local paths and ``s3://`` URIs. Holds no credentials, so it pickles
    safely into Ray tasks and workers, which resolve credentials from their own environment."""

    endpoint_url: str | None = None
    """S3 endpoint. None: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS."""

    region: str | None = None
    """S3 region. None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1."""

    retry_minutes: float = 0.0
    """How long an operation is retried while the store does not answer; 0: not at all."""

    @classmethod
    def from_config(cls, config: Any) -> Storage:
        """From a ``StorageConfig`` (or anything with ``endpoint_url``, ``region`` and ``retry_minutes``)."""
        return cls(endpoint_url=config.endpoint_url, region=config.region,
                   retry_minutes=getattr(config, "retry_minutes", 0.0))

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(budget_s=60 * self.retry_minutes)

    # -- resolution ------------------------------------------------------------------------

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def s3_filesystem(self, background_writes: bool = True) -> pafs.S3FileSystem:
        endpoint = self.resolved_endpoint()
        problem = endpoint and endpoint_problem(endpoint)
        if problem:
            source = ("storage.endpoint_url" if self.endpoint_url else
                      "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL")
            raise RaygptError(f"{source}: {problem}")
        kwargs: dict[str, Any] = dict(
            background_writes=background_writes,
            region=self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            connect_timeout=5,
            request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        )
        if endpoint:
            # pyarrow does not read the endpoint from the environment: it must be passed.
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            # Path-style addressing: MinIO and SeaweedFS serve buckets as /bucket/key.
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path within it for a local path or ``s3://`` URI."""
        check_uri(uri)
        if is_remote(uri):
            return self.s3_filesystem(), uri[len("s3://"):].rstrip("/")
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())

    def ray_storage(self, uri: str) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: on S3 a
        filesystem that retries as this ``Storage`` does (``storage.resilient``)."""
        from raygpt.storage.resilient import retrying_filesystem

        _, path = self.resolve(uri)
        if not is_remote(uri):
            return path, None
        return path, retrying_filesystem(self.s3_filesystem(background_writes=False), self.retry_policy)

    def _run(self, uri: str, action: str, operation: Callable[[], Any]) -> Any:
        """``operation()``, retried while the store does not answer, its errors explained."""
        with _explained(uri, action):
            return self.retry_policy.call(operation, f"{action} {uri}")

    # -- operations ------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return self._run(uri, "check", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)

    def stored_size(self, uri: str) -> int | None:
        """Size in bytes of a stored file, or None when there is none (or it is a folder)."""
        fs, path = self.resolve(uri)
        info = self._run(uri, "check", lambda: fs.get_file_info(path))
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self, uri: str, max_bytes: int | None = SMALL_FILE_BYTES) -> bytes:
        """The file's bytes; more than ``max_bytes`` (None: no limit) is a RaygptError, read no
        further, so a wrong path (``/dev/zero``, a shard for a manifest) never fills the memory."""
        fs, path = self.resolve(uri)

        def read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read() if max_bytes is None else f.read(max_bytes + 1)

        data = self._run(uri, "read", read)
        if max_bytes is not None and len(data) > max_bytes:
            raise RaygptError(f"{uri}: larger than {max_bytes >> 20} MiB, more than such a file ever holds; "
                              "is it the right file?")
        return data

    def sha256(self, uri: str, chunk_bytes: int = 8 << 20) -> str:
        """The SHA-256 hex digest of a stored file, read in chunks (a 1 GiB file never sits in memory)."""
        fs, path = self.resolve(uri)

        def digest() -> str:
            hashed = hashlib.sha256()
            with fs.open_input_stream(path) as f:
                while chunk := f.read(chunk_bytes):
                    hashed.update(chunk)
            return hashed.hexdigest()

        return self._run(uri, "read", digest)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: a temporary object first, moved into place when complete."""
        fs, path = self.resolve(uri)

        def write() -> None:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            if not is_remote(uri):
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            try:
                with fs.open_output_stream(tmp) as f:
                    f.write(data)
                fs.move(tmp, path)
            except BaseException:
                _delete_quietly(fs, tmp)
                raise

        self._run(uri, "write", write)

    def read_json(self, uri: str, max_bytes: int | None = SMALL_FILE_BYTES) -> Any:
        try:
            return json.loads(self.read_text(uri, max_bytes))
        except json.JSONDecodeError as e:
            raise RaygptError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def read_json_or_none(self, uri: str) -> Any:
        """``read_json``, or None when the file is missing or unreadable (half-written, damaged):
        for readers that say what they lack instead of failing."""
        try:
            return self.read_json(uri) if self.exists(uri) else None
        except RaygptError:
            return None

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2) + "\n").encode())

    def read_text(self, uri: str, max_bytes: int | None = SMALL_FILE_BYTES) -> str:
        return utf8_text(self.read_bytes(uri, max_bytes), uri)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode())

    def list(self, uri: str, recursive: bool = False) -> list[str]:
        """Names (relative to ``uri``) of the files and folders under ``uri``; [] when absent."""
        fs, path = self.resolve(uri)
        infos = self._run(uri, "list", lambda: fs.get_file_info(
            pafs.FileSelector(path, allow_not_found=True, recursive=recursive)))
        return sorted(info.path[len(path):].lstrip("/") for info in infos)

    def file_sizes(self, uri: str) -> dict[str, int]:
        """Size in bytes of each file directly under ``uri`` (folders left out); {} when absent."""
        fs, path = self.resolve(uri)
        infos = self._run(uri, "list", lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
        return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}

    def last_modified(self, uri: str) -> float | None:
        """When the newest file under ``uri`` (at any depth) was written, in UNIX seconds; None
        when there is none (or the store does not say)."""
        fs, path = self.resolve(uri)
        infos = self._run(uri, "list", lambda: fs.get_file_info(
            pafs.FileSelector(path, allow_not_found=True, recursive=True)))
        return max((info.mtime.timestamp() for info in infos
                    if info.type == pafs.FileType.File and info.mtime is not None), default=None)

    def delete(self, uri: str) -> None:
        """Delete a file or a whole folder; nothing when absent."""
        fs, path = self.resolve(uri)

        def delete() -> None:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                fs.delete_file(path)

        self._run(uri, "delete", delete)

    def download(self, uri: str, local_path: str | Path) -> None:
        """Copy a file or folder to the local disk (atomically per file)."""
        fs, path = self.resolve(uri)
        local = Path(local_path)
        self._run(uri, "download", lambda: self._download(fs, path, uri, local))

    @staticmethod
    def _download(fs: pafs.FileSystem, path: str, uri: str, local: Path) -> None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise RaygptError(f"{uri}: not found")
        if info.type == pafs.FileType.File:
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                tmp.replace(local)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(local.absolute()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    def upload(self, local_path: str | Path, uri: str) -> None:
        """Copy a local file or folder to ``uri``."""
        fs, path = self.resolve(uri)
        local = Path(local_path).absolute()
        if local.is_file():
            self.write_bytes(uri, local.read_bytes())
            return

        def upload() -> None:
            if not is_remote(uri):
                fs.create_dir(path, recursive=True)  # copy_files does not create local parents
            pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

        self._run(uri, "upload", upload)

    def check_access(self, uri: str, write: bool = False) -> None:
        """Fail early, with one clear message, when ``uri`` cannot be reached, its bucket does
        not exist, or the credentials are missing or wrong. ``write`` also proves we may write.
        Never retried: a store that does not answer before anything started is a setting to fix."""
        if self.retry_minutes:
            return replace(self, retry_minutes=0.0).check_access(uri, write)
        fs, path = self.resolve(uri)
        if is_remote(uri):
            bucket = path.split("/", 1)[0]
            if len(bucket) < 3:
                raise RaygptError(f"{uri}: S3 bucket names have at least 3 characters")
            with _explained(uri, "reach"):
                info = fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise RaygptError(f"{uri}: bucket {bucket!r} does not exist at {self.resolved_endpoint() or 'AWS S3'}")
        if write:
            probe = join(uri, f".raygpt-write-probe-{uuid.uuid4().hex[:8]}")
            self.write_bytes(probe, b"ok")
            self.delete(probe)


def write_local_atomically(path: str | Path, write: Callable[[Path], Any]) -> bool:
    """Call ``write(tmp)`` to write a temporary file beside ``path`` (same suffix), then move it
    into place: a reader (or a resumed run) never sees half a file. A ``write`` that returns
    False wrote nothing, and nothing is moved; returns whether ``path`` was written. An OSError
    names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if write(tmp) is False:
            return False
        os.replace(tmp, path)
    except OSError as e:
        raise RaygptError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


class StoreUnreachableError(RaygptError):
    """The store did not answer within ``storage.retry_minutes`` (``storage.retry``): an
    outage, not a problem with the URI."""


class _explained:
    """Turns pyarrow's S3 errors into one message naming the URI and the likely cause."""

    def __init__(self, uri: str, action: str):
        self.uri, self.action = uri, action

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, RaygptError) or not isinstance(exc, OSError):
            return False
        error = StoreUnreachableError if isinstance(exc, StoreUnavailableError) else RaygptError
        raise error(explain_storage_error(self.uri, self.action, exc)) from None


def explain_storage_error(uri: str, action: str, exc: BaseException) -> str:
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, StoreUnavailableError):
        cause = exc.reason()
    elif isinstance(exc, FileNotFoundError) or "path does not exist" in lowered or "nosuchkey" in lowered:
        cause = "not found"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        cause = "the bucket does not exist"
    elif any(s in lowered for s in ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden", "403")):
        cause = ("access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance profile) "
                 "and the bucket policy")
    elif unresolved := re.search(r"could not resolve host: (\S+)", lowered):
        cause = (f"the S3 endpoint's host name {unresolved.group(1)} does not resolve (no such host, or no network): "
                 "check storage.endpoint_url / AWS_ENDPOINT_URL")
    elif any(s in lowered for s in ("network_connection", "couldn't connect", "could not connect", "connection refused",
                                    "timed out", "timeout", "resolve host", "curl error")):
        cause = "the S3 endpoint cannot be reached: check storage.endpoint_url / AWS_ENDPOINT_URL"
    elif "credentials" in lowered:
        cause = "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or configure a profile"
    else:
        # Keep the first line only: pyarrow appends request ids and sometimes headers.
        cause = text.splitlines()[0][:300] if text else type(exc).__name__
    return f"{uri}: cannot {action}: {cause}"

