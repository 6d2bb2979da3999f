"""No credentials in logs at any verbosity: real SeaweedFS, a session token, the real CLIs' logging set-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rkckpt.logsafe import redact
from rkckpt.storage import open_storage

TOKEN = "FQoGZXIvYXdzRkslurmSessionToken0123456789abcdefSECRET"


def _env(s3_server) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID=s3_server.key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret,
        AWS_SESSION_TOKEN=TOKEN,
        AWS_ENDPOINT_URL=s3_server.endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    env.pop("RKCKPT_LOCAL_DIR", None)
    return env


def _assert_clean(text: str, s3_server) -> None:
    assert TOKEN not in text
    assert s3_server.secret not in text
    assert s3_server.key not in text


def test_redact_masks_header_forms():
    lines = [
        "headers={'X-Amz-Security-Token': b'TOKVALUE1', 'Authorization': b'AWS4-HMAC-SHA256 Credential=KEYID1/2026/s3, Signature=ab12'}",
        "x-amz-security-token:TOKVALUE1\nhost:127.0.0.1",
        "GET /b?X-Amz-Security-Token=TOKVALUE1&X-Amz-Credential=KEYID1%2F2026&X-Amz-Signature=ab12 HTTP/1.1",
        "Authorization: AWS4-HMAC-SHA256 Credential=KEYID1/2026/x, SignedHeaders=a;b, Signature=ab12",
        "access key AKIAIOSFODNN7EXAMPLE",
    ]
    for line in lines:
        out = redact(line)
        for secret in ("TOKVALUE1", "KEYID1", "ab12", "AKIAIOSFODNN7EXAMPLE"):
            assert secret not in out, (line, out)


@pytest.mark.s3
@pytest.mark.parametrize("verbosity", ["-v", "-vv"])
def test_rkckpt_cli_never_logs_credentials(s3_server, verbosity):
    url = f"s3://{s3_server.bucket()}/logs"
    open_storage(url, **s3_server.options()).save("x-000000000001-full.rkcp", b"not a checkpoint")
    code = "from rkckpt.cli import main; main()"
    p = subprocess.run(
        [sys.executable, "-c", code, verbosity, "ls", url, "--json"], capture_output=True, text=True, env=_env(s3_server), timeout=120
    )
    _assert_clean(p.stdout + p.stderr, s3_server)
    assert "Traceback" not in p.stderr
    if verbosity == "-vv":  # the signed request headers were logged, with their values masked
        assert "x-amz-security-token" in p.stderr.lower(), p.stderr[-2000:]
        assert "***" in p.stderr


@pytest.mark.s3
def test_rkrun_verbose_never_logs_credentials(s3_server, tmp_path):
    url = f"s3://{s3_server.bucket()}/rkrun"
    args = [
        "-v",
        "wavesim",
        "--grid",
        "8",
        "8",
        "8",
        "--steps",
        "4",
        "--backend",
        "numpy",
        "--checkpoint-dir",
        url,
        "--out",
        str(tmp_path / "r.h5"),
    ]
    p = subprocess.run(
        [sys.executable, "-c", "from rkkernel.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=_env(s3_server),
        timeout=300,
    )
    # SeaweedFS has no STS and refuses the session token, after botocore signed and logged each request in full
    assert "x-amz-security-token" in p.stderr.lower(), p.stderr[-3000:]
    _assert_clean(p.stdout + p.stderr, s3_server)
    assert "Traceback" not in p.stderr
    assert p.returncode == 1 and "listing failed" in p.stderr  # not "no checkpoint; starting from step 0"
