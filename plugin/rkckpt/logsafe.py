"""Logging that never shows credentials, at any verbosity.

At DEBUG, botocore, aiobotocore, s3fs and urllib3 log whole signed requests:
``X-Amz-Security-Token``, ``Authorization`` (with the access key id in its
``Credential=``) and canonical requests with the token in a header line.
``install()`` makes every log record pass through ``redact`` when it is
created (a log record factory), so it holds for every handler, including
ones added later, whichever library logged. Scrubbing happens on the
formatted message and on formatted tracebacks.

``configure()`` is what a command line calls instead of ``basicConfig``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

MASK = "***"

#: Header, parameter and keyword names whose values are credentials (matched
#: whole, case-insensitively): AWS SigV4 and v2 (``AWSAccessKeyId``,
#: ``Signature``), Google Cloud Storage V4 signed URLs, Azure SAS (``sig``;
#: ``se``/``sp``/``sv`` are not secret and stay), and the keyword names of
#: client constructors and config dicts (s3fs ``key``/``secret``/``token``).
SENSITIVE_NAMES = (
    "x-amz-security-token",
    "x-amz-credential",
    "x-amz-signature",
    "x-amz-server-side-encryption-customer-key",
    "x-goog-signature",
    "x-goog-credential",
    "x-goog-security-token",
    "x-ms-encryption-key",
    "authorization",
    "proxy-authorization",
    "awsaccesskeyid",
    "signature",
    "sig",
    "aws_session_token",
    "aws_secret_access_key",
    "aws_access_key_id",
    "aws_security_token",
    "secret_access_key",
    "secret_key",
    "access_key",
    "account_key",
    "session_token",
    "security_token",
    "client_secret",
    "access_token",
    "refresh_token",
    "sas_token",
    "api_key",
    "apikey",
    "x-api-key",
    "private_key",
    "password",
    "passwd",
    "secret",
    "token",
)
#: Names masked only in exactly this spelling: S3's ``'Key': 'prefix/object'``
#: (botocore's request parameters) is an object name, s3fs's ``key='AKIA...'`` is not.
CASE_SENSITIVE_NAMES = ("key",)
_NAMES = "|".join(re.escape(n) for n in SENSITIVE_NAMES)
#: A name that is, or ends in, one of them (db_password, MY_API_TOKEN, x-custom-signature).
_SENSITIVE_NAME = re.compile(rf"(?i)(?:^|[_-])(?:{_NAMES})$")
#: ``name=`` / ``name:`` / ``'name': `` / ``"name"=`` (kwarg and dict reprs, headers, query strings,
#: canonical requests). Only the name and the separator: a value is taken only after a sensitive name,
#: so a harmless ``name: value`` never swallows a ``secret=...`` inside its value. One pass over the
#: text with a cheap pattern; the name is then checked on its own (the long alternation of names at
#: every position of a megabyte -vv body was the slow part).
_NAME_SEP = re.compile(r"""(?<![\w-])['"]?(\w[\w-]*)['"]?\s*[:=]\s*""")
#: A quoted value (bytes too), backslash escapes included: 'ab\'c'
_QUOTED_VALUE = re.compile(r"""b?(['"])(?:\\.|(?!\1)[^\\])*\1""")
_BARE_VALUE = re.compile(r"""[^\s,'"})&;]+""")
_PATTERNS = (
    re.compile(r"(?i)(Credential=)[^/\s,&'\"]+"),
    re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA|ANPA|AGPA)[A-Z0-9]{12,}\b"),
)
#: ``scheme://userinfo@`` (greedy to the last ``@`` before the path: a password may hold a raw ``@``).
_URL_USERINFO = re.compile(r"""(?i)\b([a-z][a-z0-9+.-]*://)([^/\s?#'"<>\[\]]*)@""")
#: ``user:password@host`` without a scheme (urllib3's "Starting new HTTP connection (1): u:pw@host:port").
_BARE_USERINFO = re.compile(r"""(?<![\w/:@.%+-])([\w.%+-]+):([^\s@/'"<>]+)@(?=[\w\[])""")
#: A user name alone is shown (``ssh://git@host``); a lone userinfo that is not
#: one (a token: ``https://ghp_...@host``, long or not a plain login) is masked.
_LOGIN = re.compile(r"^[a-z_][a-z0-9_.-]{0,15}$")
_ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def register_secret(*values: str | None) -> None:
    """Values (keys, secrets, tokens) to mask wherever they appear in a log message."""
    with _lock:
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= 4)


def _mask(m: re.Match[str]) -> str:
    return (m.group(1) if m.re.groups else "") + MASK


def _mask_userinfo(m: re.Match[str]) -> str:
    user, sep, _password = m.group(2).partition(":")
    if sep:
        return f"{m.group(1)}{user}:{MASK}@"
    return m.group(0) if _LOGIN.match(user) else f"{m.group(1)}{MASK}@"


def _mask_named_values(text: str) -> str:
    """Mask the value after every sensitive name (``secret='***'``, ``X-Amz-Signature=***&``)."""
    out: list[str] = []
    pos = 0
    for m in _NAME_SEP.finditer(text):
        name = m.group(1)
        if m.start() < pos or not (name in CASE_SENSITIVE_NAMES or _SENSITIVE_NAME.search(name)):
            continue
        end = m.end()
        q = _QUOTED_VALUE.match(text, end)
        if q:  # keep the quotes (and a bytes prefix): the repr stays readable
            out += [text[pos : q.start(1) + 1], MASK, q.group(1)]
            pos = q.end()
            continue
        if text.startswith(("'", '"', "b'", 'b"'), end):  # a quote never closed (a cut message): up to the line's end
            stop = text.find("\n", end)
            stop = len(text) if stop < 0 else stop
            out += [text[pos:end], MASK]
            pos = stop
            continue
        v = _BARE_VALUE.match(text, end)
        if v:
            out += [text[pos:end], MASK]
            pos = v.end()
    out.append(text[pos:])
    return "".join(out)


def redact(text: str) -> str:
    """``text`` with credential values replaced by ``***``.

    URL passwords (``scheme://user:***@host``), signature and credential
    parameters of signed URLs, credential headers, and keyword/dict reprs
    (``secret='***'``, ``'password': '***'``), then every registered secret.
    """
    if "://" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    if "@" in text:
        text = _BARE_USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    text = _mask_named_values(text)
    for p in _PATTERNS:
        text = p.sub(_mask, text)
    with _lock:
        known = sorted(_secrets | {v for k in _ENV_SECRETS if len(v := os.environ.get(k, "")) >= 4}, key=len, reverse=True)
    for s in known:
        text = text.replace(s, MASK)
    return text


def _scrub(record: logging.LogRecord) -> None:
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is the logging module's to report
        return
    clean = redact(msg)
    if clean != msg or record.args:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install() -> None:
    """Scrub every log record of this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub(record)
        return record

    logging.setLogRecordFactory(factory)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure(verbosity: int, prog: str) -> None:
    """Log to stderr as ``prog: message``: 0 warnings, 1 info, 2+ debug (libraries included).

    Installs the scrubbing first, and replaces only a handler an earlier call
    added, so a host's own handlers (pytest's, an application's) stay.
    """
    install()
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
