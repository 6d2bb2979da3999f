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


@pytest.mark.parametrize(
    ("line", "secrets", "kept"),
    [
        # URL userinfo: the password masked, the user kept; a raw @ in the password; without a scheme (urllib3)
        ("endpoint http://u:pw@127.0.0.1:8333/b", ["u:pw@", ":pw@"], ["http://u:***@127.0.0.1:8333/b"]),
        ("s3://AKID:wJalr%2FXUtn@bucket/prefix", ["wJalr"], ["s3://AKID:***@bucket/prefix"]),
        ("http://user:p@ss@host:9000/x", ["p@ss", "ss@host"], ["http://user:***@host:9000/x"]),
        ("Starting new HTTP connection (1): u:pw@127.0.0.1:8333", [":pw@"], ["u:***@127.0.0.1:8333"]),
        # a lone userinfo that is a token is masked, a login name is not
        ("https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/o/r", ["ghp_16C7e42F"], ["https://***@github.com/o/r"]),
        ("ssh://git@github.com/o/r", [], ["ssh://git@github.com/o/r"]),
        # Google Cloud Storage V4 signed URL
        (
            "GET /b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=svc%40p.iam.gserviceaccount.com%2F20260101"
            "&X-Goog-Date=20260101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b2c3d4e5f",
            ["svc%40p", "0a1b2c3d4e5f"],
            ["X-Goog-Expires=900", "X-Goog-Date=20260101T000000Z"],
        ),
        # Azure SAS: sig is the secret, se (expiry) and sp (permissions) are not
        (
            "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2026-12-08T00%3A00%3A00Z&sr=b&sp=r&sig=AbCdEf%2BgH%3D",
            ["AbCdEf"],
            ["se=2026-12-08T00%3A00%3A00Z", "sp=r", "sig=***"],
        ),
        # AWS signature v2 query string
        (
            "https://b.s3.amazonaws.com/o?AWSAccessKeyId=AKIDEXAMPLE1&Expires=1700000000&Signature=vjbyPxybdZaN%2ByT2%3D",
            ["AKIDEXAMPLE1", "vjbyPxybdZaN"],
            ["Expires=1700000000"],
        ),
        # keyword reprs: kwargs and dicts, both quote styles, escaped quotes, bytes; S3's object 'Key' stays
        (
            "S3FileSystem(key='AKIDSECRET1', secret='s3cr3t!', token='tok123', endpoint_url='http://h')",
            ["AKIDSECRET1", "s3cr3t!", "tok123"],
            ["endpoint_url='http://h'", "key='***'"],
        ),
        (
            "{'key': 'AKIDSECRET1', 'secret': 's3cr3t!', 'password': 'hunter2', 'Key': 'pre/x-0001-full.rkcp'}",
            ["AKIDSECRET1", "s3cr3t!", "hunter2"],
            ["'Key': 'pre/x-0001-full.rkcp'"],
        ),
        ('connect(password="hun\\"ter2", user=\'bob\')', ["hun", "ter2"], ["user='bob'", 'password="***"']),
        ("opts {'aws_secret_access_key': b'wJalrXUtnFEMI', \"db_password\": \"pw9\"}", ["wJalrXUtnFEMI", "pw9"], ["db_password"]),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI MY_API_TOKEN=abc123 passwd=pw9", ["wJalrXUtnFEMI", "abc123", "pw9"], []),
        # a value inside a harmless "name: value" is still looked at; a quote cut off by a truncated message
        ("rkckpt: debug: secret=s3cr3t! __token=tok9", ["s3cr3t!", "tok9"], ["rkckpt: debug: secret=***"]),
        ("kwargs {'password': 'hunter2 and the message was cut\nnext line", ["hunter2", "cut"], ["next line"]),
    ],
)
def test_redact_masks_urls_signatures_and_keyword_reprs(line: str, secrets: list[str], kept: list[str]) -> None:
    out = redact(line)
    for secret in secrets:
        assert secret not in out, (line, out)
    for text in kept:
        assert text in out, (line, out)
    assert "***" in out or not secrets


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


@pytest.mark.s3
def test_endpoint_password_never_logged_by_rkckpt_vv_ls(s3_server):
    """``RKCKPT_S3_ENDPOINT=http://u:pw@host``: ``rkckpt -vv ls`` printed the password ~100 times.

    The password is 3 characters, shorter than a registered secret may be
    (4), so only the userinfo pattern can mask it: in botocore's request
    repr, urllib3/aiohttp lines and the final error alike.
    """
    url = f"s3://{s3_server.bucket()}/ep"
    open_storage(url, **s3_server.options()).save("x-000000000001-full.rkcp", b"not a checkpoint")
    password = "Zq!"
    env = _env(s3_server)
    env.pop("AWS_SESSION_TOKEN")
    env.pop("AWS_ENDPOINT_URL")
    env["RKCKPT_S3_ENDPOINT"] = s3_server.endpoint.replace("://", f"://u:{password}@", 1)
    p = subprocess.run(
        [sys.executable, "-c", "from rkckpt.cli import main; main()", "-vv", "ls", url, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    out = p.stdout + p.stderr
    assert password not in out and "Zq%21" not in out, out[-3000:]
    host = s3_server.endpoint.split("://", 1)[1]
    assert f"u:***@{host}" in p.stderr, p.stderr[-3000:]  # botocore logged the endpoint: masked, not dropped
    _assert_clean(out, s3_server)
    # whatever botocore logs at DEBUG (tracebacks of its own retries included), rkckpt ends in one error line
    assert p.returncode != 0 and p.stderr.rstrip().splitlines()[-1].startswith("rkckpt: error: s3://"), p.stderr[-2000:]
