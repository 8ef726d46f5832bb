"""A real S3-compatible server for the tests: moto in server mode on loopback, with a bucket and credentials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prefect_env import free_port

BIN = Path(sys.executable).parent


class MotoS3:
    """`moto_server` on a free port; `env` holds what boto/s3fs read (endpoint, dummy keys, region)."""

    def __init__(self, log_dir: Path, bucket: str = "distill-test"):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.log_path = log_dir / "moto.log"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> MotoS3:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}") from None
                time.sleep(0.2)
        else:
            raise RuntimeError(f"moto_server did not start: {self.log_path.read_text()[-2000:]}")
        self.filesystem().mkdir(self.bucket)
        return self

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint, skip_instance_cache=True)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=20)
        self._proc = None
