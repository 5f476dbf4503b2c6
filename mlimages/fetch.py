"""HTTP fetching for the download stage, with urllib3: bounded in time, size, hops and per host.

One :class:`Fetcher` per executor process is shared by the task's threads (urllib3 pools are
thread safe). Each request has connect and read timeouts and an overall deadline, a body limit,
a redirect limit (redirects are followed here, so every hop is checked by :mod:`netguard`), and
a per-host cap on concurrent requests. Failures come back as a status, never as an exception.
"""
import contextlib
import dataclasses
import email.utils
import logging
import random
import socket
import threading
import time
import urllib.parse

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from mlimages import netguard

log = logging.getLogger(__name__)

REDIRECTS = (301, 302, 303, 307, 308)
NO_RETRY = (403, 404, 410)
CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 20.0  # longest wait for any single read
    deadline: float = 60.0  # whole attempt, redirects and body included
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 5
    per_host: int = 8  # concurrent requests to one host, per executor process
    max_attempts: int = 3
    backoff: float = 0.5  # seconds before the 2nd attempt; doubles each time, with jitter
    backoff_max: float = 10.0
    retry_after_max: float = 30.0  # longest Retry-After honoured
    user_agent: str = "mlimages/0.1 (dataset builder; respects X-Robots-Tag noai)"
    optout_directives: tuple = ("noai", "noimageai")  # empty: ignore X-Robots-Tag
    allow_loopback: bool = False
    allow_private: bool = False
    offline: bool = False

    def __post_init__(self):
        # YAML gives a list; a tuple keeps the options hashable (one fetcher per options).
        object.__setattr__(self, "optout_directives", tuple(self.optout_directives or ()))
        if self.per_host < 1 or self.max_attempts < 1 or self.max_bytes < 1:
            raise ValueError("per_host, max_attempts and max_bytes must be at least 1")

    @property
    def policy(self) -> netguard.Policy:
        return netguard.Policy(self.allow_loopback, self.allow_private, self.offline)


@dataclasses.dataclass
class Fetched:
    """Outcome of fetching one URL; ``body`` is set only when ``status`` is ok."""

    status: str
    http_status: int = None
    error: str = None
    attempts: int = 0
    body: bytes = None
    content_type: str = None
    retryable: bool = False
    retry_after: float = None


class _Failed(Exception):
    def __init__(self, status, error, retryable=False):
        super().__init__(error)
        self.status, self.error, self.retryable = status, error, retryable


def _guarded_new_conn(self):
    """urllib3's ``_new_conn``, but connecting only to addresses :mod:`netguard` accepts."""
    try:
        return netguard.connect_checked(self._dns_host, self.port, self.timeout,
                                        self.policy, self.socket_options)
    except socket.gaierror as err:
        raise NameResolutionError(self.host, self, err) from err
    except TimeoutError as err:
        raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from err
    except OSError as err:
        raise NewConnectionError(self, f"failed to connect: {err}") from err


def _pool_classes(policy: netguard.Policy) -> dict:
    attrs = {"_new_conn": _guarded_new_conn, "policy": policy}
    plain = type("GuardedHTTPConnection", (HTTPConnection,), attrs)
    tls = type("GuardedHTTPSConnection", (HTTPSConnection,), attrs)
    return {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": plain}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": tls}),
    }


def parse_retry_after(value) -> float:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def opted_out(header, directives, agent: str) -> bool:
    """True when an ``X-Robots-Tag`` value holds one of ``directives`` for all agents or ours.

    ``X-Robots-Tag: otherbot: noai`` applies to another crawler only, so it does not count.
    """
    if not header or not directives:
        return False
    wanted = {d.lower() for d in directives}
    token = agent.split("/", 1)[0].lower()
    for part in header.split(","):
        name, sep, rest = part.partition(":")
        if sep and " " not in name.strip():
            if name.strip().lower() != token:
                continue
            part = rest
        if part.strip().lower() in wanted:
            return True
    return False


class Fetcher:
    """Fetches URLs under one set of :class:`FetchOptions`; safe to share between threads."""

    def __init__(self, options: FetchOptions, num_pools: int = 512):
        self.options = options
        self.policy = options.policy
        self.pool = urllib3.PoolManager(
            num_pools=num_pools, maxsize=options.per_host, block=False, retries=False,
            headers={"User-Agent": options.user_agent, "Accept": "image/*,*/*;q=0.5"})
        self.pool.pool_classes_by_scheme = _pool_classes(self.policy)
        self._slots = {}
        self._slots_lock = threading.Lock()

    @contextlib.contextmanager
    def _host_slot(self, host: str):
        with self._slots_lock:
            slot = self._slots.get(host)
            if slot is None:
                slot = self._slots[host] = threading.BoundedSemaphore(self.options.per_host)
        with slot:
            yield

    def fetch(self, url: str) -> Fetched:
        """Fetches ``url`` with retries; returns the outcome and the number of attempts."""
        attempt = 0
        while True:
            attempt += 1
            outcome = self._attempt(url)
            outcome.attempts = attempt
            if not outcome.retryable or attempt >= self.options.max_attempts:
                return outcome
            time.sleep(self._delay(attempt, outcome.retry_after))

    def _delay(self, attempt: int, retry_after) -> float:
        if retry_after is not None:
            return min(retry_after, self.options.retry_after_max)
        ceiling = min(self.options.backoff_max, self.options.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # jitter keeps retries from marching

    def _attempt(self, url: str) -> Fetched:
        deadline = time.monotonic() + self.options.deadline
        try:
            return self._follow(url, deadline)
        except _Failed as failed:
            return Fetched(failed.status, error=failed.error, retryable=failed.retryable)
        except netguard.Offline as err:
            return Fetched("offline", error=str(err))
        except (netguard.Blocked, LocationParseError) as err:
            return Fetched("blocked", error=str(err))
        except NameResolutionError as err:
            return Fetched("dns_error", error=f"name resolution failed: {err.__cause__}")
        except NewConnectionError as err:  # before timeouts: urllib3 makes it a subclass
            return Fetched("connection_error", error=_scrub(str(err), url))
        except (ConnectTimeoutError, ReadTimeoutError, TimeoutError):
            return Fetched("timeout", error="connect or read timed out", retryable=True)
        except SSLError as err:
            return Fetched("connection_error", error=f"TLS: {_scrub(str(err), url)}")
        except (ProtocolError, HTTPError, OSError) as err:
            # Resets and bodies cut short: worth another try.
            return Fetched("connection_error", error=f"{type(err).__name__}: "
                           f"{_scrub(str(err), url)}", retryable=True)

    def _follow(self, url: str, deadline: float) -> Fetched:
        current = url
        for _ in range(self.options.max_redirects + 1):
            parts = netguard.check_url(current, self.policy)
            with self._host_slot(parts.hostname):
                outcome, location = self._request(current, deadline)
            if location is None:
                return outcome
            current = urllib.parse.urljoin(current, location)
        raise _Failed("too_many_redirects",
                      f"more than {self.options.max_redirects} redirects")

    def _timeout(self, deadline: float) -> urllib3.Timeout:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failed("timeout", f"deadline of {self.options.deadline} s passed", True)
        return urllib3.Timeout(connect=min(self.options.connect_timeout, left),
                               read=min(self.options.read_timeout, left))

    def _request(self, url: str, deadline: float):
        """One request: ``(Fetched, None)``, or ``(None, location)`` for a redirect."""
        response = self.pool.request("GET", url, preload_content=False, redirect=False,
                                     retries=False, timeout=self._timeout(deadline))
        try:
            status = response.status
            if status in REDIRECTS and response.headers.get("Location"):
                return None, response.headers["Location"]
            if status >= 400 or status < 200:
                return self._http_failure(response), None
            if opted_out(response.headers.get("X-Robots-Tag"), self.options.optout_directives,
                         self.options.user_agent):
                return Fetched("opted_out", status, "X-Robots-Tag: "
                               f"{response.headers.get('X-Robots-Tag')}"), None
            body = self._read_body(response, deadline)
            return Fetched("ok", status, body=body,
                           content_type=response.headers.get("Content-Type")), None
        finally:
            response.release_conn()

    def _http_failure(self, response) -> Fetched:
        status = response.status
        response.close()  # the error body is not wanted; don't read it to reuse the socket
        retryable = status == 429 or (status >= 500 and status not in (501, 505))
        retry_after = parse_retry_after(response.headers.get("Retry-After")) if retryable else None
        return Fetched("http_error", status, f"HTTP {status} {response.reason or ''}".strip(),
                       retryable=retryable and status not in NO_RETRY, retry_after=retry_after)

    def _read_body(self, response, deadline: float) -> bytes:
        limit = self.options.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            raise _Failed("too_large", f"Content-Length {declared} is over {limit} bytes")
        chunks, size = [], 0
        while True:
            if time.monotonic() > deadline:
                response.close()
                raise _Failed("timeout", f"body not complete within the deadline of "
                              f"{self.options.deadline} s ({size} bytes read)", True)
            # read1 returns after one socket read, so a slow drip still reaches the check above.
            chunk = response.read1(CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                response.close()
                raise _Failed("too_large", f"body is over {limit} bytes")
            chunks.append(chunk)


def _scrub(message: str, url: str) -> str:
    """Removes the URL's secrets from an error message that may quote the URL."""
    parts = urllib.parse.urlsplit(url)
    for secret in (parts.query, parts.password, parts.username):
        if secret:
            message = message.replace(secret, netguard.REDACTED)
    return message


_fetchers = {}
_fetchers_lock = threading.Lock()


def shared_fetcher(options: FetchOptions) -> Fetcher:
    """One fetcher per process and options, so connections are reused across tasks."""
    with _fetchers_lock:
        fetcher = _fetchers.get(options)
        if fetcher is None:
            fetcher = _fetchers[options] = Fetcher(options)
        return fetcher
