"""How a remote read meets a failure: what is retried (`transient`), how long and how often (`Retrying`), and what
a file that still fails is (`ShardUnavailable`).

Only the network and a server's passing state are retried: a refused, dropped or timed-out connection, a body cut
short, HTTP 408, 425, 429 and 5xx (a store's client's own errors for these too). A missing or forbidden file (404,
403, `FileNotFoundError`, `PermissionError`) is unavailable at once, and anything else, a bug in this code
included, is raised as it is: never taken for an unreachable shard.

Waits grow as capped exponential backoff with full jitter (a random wait up to 0.5 s, 1 s, 2 s, ... 30 s: processes
and workers that failed together do not return together), at least as long as a server's `Retry-After`, and stop
when the failures in a row have lasted `--remote_retry_seconds` (a read that makes progress starts the count
again). `Retrying`'s clock and sleep are parameters, so tests spend no time waiting.
"""

from __future__ import annotations

import email.utils
import http.client
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3

from ..config import REMOTE_RETRY_SECONDS

FIRST_WAIT_S, LONGEST_WAIT_S = 0.5, 30.0
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_JITTER = random.SystemRandom()  # (not `random`'s seeded state: every process would draw the same waits)


class ShardUnavailable(OSError):
    """A remote file that is missing or forbidden, or still fails when its retries are spent."""


@dataclass(frozen=True)
class Retrying:
    """How long failures in a row are retried (module docstring): `seconds` (0: never), on `clock`, by `sleep`."""

    seconds: float = REMOTE_RETRY_SECONDS
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def streak(self, url: str) -> Retries:
        return Retries(self, url)


DEFAULT_RETRYING = Retrying()


class Retries:
    """One file's failures in a row: `wait` before each next attempt (or `ShardUnavailable` when the budget is
    spent), `reset` when a read made progress."""

    def __init__(self, retrying: Retrying, url: str) -> None:
        self.retrying, self.url = retrying, url
        self.attempts, self.since = 0, None

    def reset(self) -> None:
        self.attempts, self.since = 0, None

    def wait(self, failure: BaseException | str, retry_after: float | None = None, where: str = "") -> None:
        """Sleep before the next attempt after `failure` (at least `retry_after` seconds, the server's
        Retry-After), or raise `ShardUnavailable` naming the URL, the failure and the option that allows more."""
        now = self.retrying.clock()
        self.since = now if self.since is None else self.since
        self.attempts += 1
        waited, budget = now - self.since, self.retrying.seconds
        left = budget - waited
        if left <= 0 or (retry_after is not None and retry_after > left):
            asked = f"; the server asks to wait {retry_after:.0f} s" if retry_after is not None and left > 0 else ""
            raise ShardUnavailable(
                f"{self.url}: {describe(failure)}{where}, {self.attempts} times in {waited:.0f} s{asked}; "
                f"--remote_retry_seconds {budget:g} sets how long a failing read is retried"
            )
        delay = _JITTER.uniform(0, min(LONGEST_WAIT_S, FIRST_WAIT_S * 2 ** min(self.attempts - 1, 16)))
        self.retrying.sleep(min(max(delay, retry_after or 0.0), left))


def describe(failure: BaseException | str) -> str:
    if isinstance(failure, str):
        return failure
    return f"{type(failure).__name__}: {failure}" if str(failure) else type(failure).__name__


def transient(error: BaseException) -> bool:
    """Whether `error` is the network's or a server's passing state (worth another attempt), not a missing or
    forbidden file, a bad request or a bug."""
    status = status_of(error)
    if status is not None:
        return status in RETRY_STATUSES
    if isinstance(error, ShardUnavailable | FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(error, requests.RequestException):  # (an OSError too; a bad URL or certificate is not passing)
        transport = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
        return isinstance(error, transport) and not isinstance(error, requests.exceptions.SSLError)
    return isinstance(error, _transport_errors())


def raise_unless_transient(error: Exception, url: str) -> None:
    """Return if `error` is worth another attempt (`transient`); else raise it: as `ShardUnavailable` where it says
    the file is not there or not ours to read (a status, `FileNotFoundError`, ...), else as it is (a bug)."""
    if transient(error):
        return
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError) or status_of(error) is not None:
        raise ShardUnavailable(f"{url}: {type(error).__name__}: {error}") from None
    raise error


def status_of(error: BaseException) -> int | None:
    """The HTTP status a store client's error carries (requests', huggingface_hub's, gcsfs', botocore's), if any."""
    for cause in (error, error.__cause__):
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(response, dict):  # botocore's ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        status = status if status is not None else getattr(cause, "code", None)  # gcsfs' HttpError
        if isinstance(status, int) and 100 <= status < 600:
            return status
    return None


def retry_after(value: str | None) -> float | None:
    """A `Retry-After` header's wait in seconds (it gives seconds, or an HTTP date); None where there is none."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def retry_after_of(error: BaseException) -> float | None:
    """The `Retry-After` of the response a store client's error carries, if any."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    return retry_after(headers.get("Retry-After")) if headers is not None else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a refused, dropped or timed-out connection raises: the standard library's and urllib3's, and the store
    clients' that are loaded (an error of a package not imported cannot have been raised)."""
    found: list[type[BaseException]] = [OSError, http.client.HTTPException]
    found += [urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, urllib3.exceptions.NewConnectionError]
    optional = {
        "botocore.exceptions": ("HTTPClientError", "ConnectionError"),
        "aiohttp": ("ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"),
        "httpx": ("TransportError",),
        "httpx2": ("TransportError",),
        "fsspec.exceptions": ("FSTimeoutError",),
    }
    for module, names in optional.items():
        if module in sys.modules:
            found += [getattr(sys.modules[module], name) for name in names if hasattr(sys.modules[module], name)]
    return tuple(found)
