"""Stores on object storage: ``s3://``, ``gs://`` and ``http(s)://`` URLs, through fsspec.

A URL goes wherever a store path does (job files, ``distnet data``, :class:`StreamLoader`,
both engines). fsspec picks the file system from the scheme: s3fs for ``s3://`` (extra
``[s3]``), gcsfs for ``gs://`` (extra ``[gcs]``), aiohttp for ``http(s)://``. This module
adds what a cluster needs on top:

- credentials come only from the standard environment and the provider's config files
  (``AWS_ACCESS_KEY_ID``/``~/.aws/credentials``, ``AWS_ENDPOINT_URL`` for an S3-compatible
  server, ``GOOGLE_APPLICATION_CREDENTIALS``): a URL with ``user:secret@`` in it and
  credential storage options are refused, and URLs are scrubbed before they are printed;
- a bounded number of concurrent requests per process (one rank): ``max_pool_connections``;
- retries with exponential back-off and jitter on throttling (503 SlowDown) and transient
  errors (botocore's ``standard`` retry mode), and a timeout on every request, so that a
  server that stops answering ends in an error instead of a hang;
- :func:`describe_failure`: one clear message for a missing object, a refused credential or
  a timeout (the caller adds the URL and the chunk).

Knobs for jobs (which carry no storage options): ``DISTNET_OBJECT_REQUESTS`` (concurrent
requests per rank, default 16), ``DISTNET_OBJECT_TIMEOUT_S`` (per request, default 30),
``DISTNET_OBJECT_RETRIES`` (attempts on throttling/transient errors, default 6).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https")
# storage options that would put a secret into a command line, a job file or a log
CREDENTIAL_OPTIONS = frozenset(
    {"key", "secret", "token", "password", "username", "session_token", "access_key",
     "secret_key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
     "client_secret", "refresh_token", "auth"}
)  # fmt: skip


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}: expected a number > 0")
    return value


def max_requests() -> int:
    """Concurrent requests one process (rank) may have open to one object store."""
    return int(_env_number("DISTNET_OBJECT_REQUESTS", 16))


def request_timeout() -> float:
    """Seconds one request may take (connect, and each read) before it is an error."""
    return _env_number("DISTNET_OBJECT_TIMEOUT_S", 30.0)


def retries() -> int:
    """Attempts per request on throttling and transient errors (back-off between them)."""
    return int(_env_number("DISTNET_OBJECT_RETRIES", 6))


def scheme(path: str) -> str:
    """The URL scheme of ``path`` in lower case; "" for a local path."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep else ""


def is_object_url(path: str) -> bool:
    """Whether ``path`` names a store on object storage or HTTP (not a local path)."""
    return scheme(path) in OBJECT_SCHEMES


def scrub(path: str) -> str:
    """``path`` with any ``user:secret@`` removed (safe to print)."""
    path = str(path)
    if "://" not in path:
        return path
    parts = urlsplit(path)
    if "@" not in parts.netloc:
        return path
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def check_url(path: str) -> None:
    """Refuses a URL that carries credentials (they belong in the environment)."""
    path = str(path)
    if "://" in path and "@" in urlsplit(path).netloc:
        raise ValueError(
            f"{scrub(path)}: credentials in a store URL are refused (they would end up in job "
            "files, logs and process lists); give them through the environment or the "
            "provider's config files (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
            "~/.aws/credentials, GOOGLE_APPLICATION_CREDENTIALS)"
        )


def check_options(path: str, options: dict[str, Any] | None) -> None:
    """Refuses storage options that hold credentials (same reason as :func:`check_url`)."""
    bad = sorted(k for k in options or {} if k.lower() in CREDENTIAL_OPTIONS)
    if bad:
        raise ValueError(
            f"{scrub(path)}: storage option(s) {', '.join(bad)} would carry credentials; "
            "give them through the environment or the provider's config files instead"
        )


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def storage_options(path: str, given: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """fsspec options for ``path``: this module's defaults (bounded requests, retries,
    timeouts) under the ``given`` ones; None for a local path. Refuses credentials."""
    path = str(path)
    if "://" not in path:
        return None
    check_url(path)
    given = dict(given or {})
    check_options(path, given)
    s = scheme(path)
    if s in ("s3", "s3a"):
        t = request_timeout()
        defaults: dict[str, Any] = {
            "config_kwargs": {
                "max_pool_connections": max_requests(),
                "connect_timeout": t,
                "read_timeout": t,
                # standard mode: exponential back-off with jitter, retries throttling
                # (SlowDown, 503) and transient errors (500, 502, 504, connection resets);
                # total_max_attempts counts the first try (max_attempts would not)
                "retries": {"total_max_attempts": retries(), "mode": "standard"},
            },
        }
        # an S3-compatible server (MinIO, Ceph, a test server): botocore's variable, passed on
        # explicitly since not every aiobotocore release reads it
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            defaults["endpoint_url"] = endpoint
    elif s in ("gs", "gcs"):
        defaults = {"timeout": request_timeout()}  # gcsfs retries 6 times with back-off
    elif s in ("http", "https"):
        import aiohttp  # noqa: PLC0415  (fsspec's HTTP file system needs it anyway)

        defaults = {
            "client_kwargs": {
                "timeout": aiohttp.ClientTimeout(
                    total=None, sock_connect=request_timeout(), sock_read=request_timeout()
                )
            }
        }
    else:
        defaults = {}
    return _merge(defaults, given)


def single_retry_loop(fs: Any) -> None:
    """Leaves the retrying to botocore's (``storage_options``: ``retries()`` attempts with
    back-off) on an ``s3fs.S3FileSystem`` ``fs``: s3fs wraps every call in a loop of its own
    (``retries``, a class attribute, 5), so ``DISTNET_OBJECT_RETRIES`` meant five times as
    many requests, and a store that stopped answering failed that much later."""
    if fs is not None and type(fs).__name__ == "S3FileSystem":
        fs.retries = 1


_CREDENTIAL_CODES = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ExpiredToken|InvalidToken|"
    r"AuthorizationHeaderMalformed|Forbidden|Unauthorized|\b40[13]\b"
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def describe_failure(exc: BaseException) -> str:
    """What went wrong with a request, in words: "object missing", "credentials refused",
    "timed out", or the exception itself (URLs in it scrubbed)."""
    chain = _chain(exc)
    names = " ".join(type(e).__name__ for e in chain)
    text = " ".join(str(e) for e in chain)
    detail = scrub_text(f"{type(exc).__name__}: {exc}")
    if any(isinstance(e, FileNotFoundError) for e in chain) or "NoSuchKey" in text:
        return f"object missing ({detail})"
    if any(isinstance(e, PermissionError) for e in chain) or _CREDENTIAL_CODES.search(text):
        return (
            "credentials refused by the server (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            f"or the provider's config files) ({detail})"
        )
    if any(isinstance(e, TimeoutError | asyncio.TimeoutError) for e in chain) or re.search(
        r"Timeout", names
    ):
        return f"timed out (no answer in {request_timeout():g} s per request) ({detail})"
    return detail


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def scrub_text(text: str) -> str:
    """``text`` with the ``user:secret@`` part of any URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)
