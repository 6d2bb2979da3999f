"""No credentials in logs at any verbosity: real SeaweedFS, a session token, the real CLIs' logging set-up."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from rkckpt.logsafe import redact
from rkckpt.storage import StorageError, open_storage

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
def test_rkrun_verbose_logging_masks_session_token(s3_server, capfd):
    from rkkernel.cli import _setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        _setup_logging(True)  # what `rkrun -v` does
        env = _env(s3_server)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            s = open_storage(f"s3://{s3_server.bucket()}/rkrun")
            s.list_attempts = 1
            # SeaweedFS has no STS: it refuses a session token (InvalidAccessKeyId) after the request
            # was signed and logged in full, which is what this test is about
            for op in (lambda: s.save("a", b"1"), s.list):
                try:
                    op()
                except StorageError as exc:
                    _assert_clean(str(exc), s3_server)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert "x-amz-security-token" in err.lower()  # botocore did log the signed headers
    _assert_clean(err, s3_server)
