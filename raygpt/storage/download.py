"""Inputs a spec names by an http(s) URL (HellaSwag, instruction data): downloaded once, then read locally.

One downloader for every such input. The cached copy is named by the URL's hash and its file
name, so two sources whose files share a name never share an entry; a download goes to a
temporary file that is renamed when complete, so an interrupted one leaves nothing behind and
tasks that download at once on one node each rename a complete copy. A user:password in the
URL is sent as HTTP Basic auth (urllib itself would take it for a port) and never appears in
a message or a file name.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from raygpt.errors import RaygptError
from raygpt.storage import Storage, without_userinfo

DOWNLOAD_TIMEOUT_S = 30.0
"""Seconds to wait for the server to connect or send the next bytes."""

DATA_FILE_BYTES = 1 << 30
"""What an input file may hold: HellaSwag's validation file has 11 MB, Alpaca's 52k
instructions 22 MB; a larger file is the wrong one."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def default_cache_dir(kind: str) -> Path:
    """Where downloads of ``kind`` are kept: ``$RAYGPT_CACHE_DIR/<kind>``, else ``~/.cache/raygpt/<kind>``."""
    root = os.environ.get("RAYGPT_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "raygpt") / kind


def read_input(source: str, storage: Storage, cache_dir: Path, what: str, instead: str,
               timeout_s: float = DOWNLOAD_TIMEOUT_S) -> tuple[bytes, str]:
    """The bytes of ``source`` (an http(s) URL, downloaded once into ``cache_dir``; a local path
    or an ``s3://`` URI, read through ``storage``) and the name to give it in messages: the
    cached file for a URL. ``what`` and ``instead`` word a failed download: "cannot download
    {what} (why); {instead}"."""
    if not is_url(source):
        return storage.read_bytes(source, max_bytes=DATA_FILE_BYTES), source
    path = cached_download(source, cache_dir, what, instead, timeout_s)
    return storage.read_bytes(str(path), max_bytes=DATA_FILE_BYTES), str(path)


def cached_download(url: str, cache_dir: Path, what: str, instead: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """The local copy of ``url`` in ``cache_dir``: downloaded when absent, else reused as it is."""
    shown = without_userinfo(url)
    parts = urlsplit(url)
    file_name = Path(urlsplit(shown).path).name or "download"
    path = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{file_name}"
    if path.is_file():
        return path
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RaygptError(f"{cache_dir}: cannot write the download cache ({e.strerror or e}); "
                          "set RAYGPT_CACHE_DIR to a writable folder") from None
    request = urllib.request.Request(shown)
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(request, timeout=timeout_s) as response:
            shutil.copyfileobj(response, f)
        os.replace(tmp, path)
    except (OSError, http.client.HTTPException) as e:  # URLError and socket timeouts are OSErrors
        raise RaygptError(f"{shown}: cannot download {what} ({_failure(e, timeout_s)}); {instead}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _failure(error: BaseException, timeout_s: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__
