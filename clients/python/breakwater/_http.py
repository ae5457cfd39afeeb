"""Calls to the control plane's JSON API: the token, retries and errors.

Every call is a JSON request and a JSON answer. A call is sent again, a
few times with a growing pause, when the connection failed or the control
plane answered 503. A call that is not idempotent is sent again only when
it surely never arrived (the connection was refused or timed out, or 503).
A stream of JSON lines (a saga watch) is retried the same way until its
answer begins, and not after.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from . import __version__
from .errors import BreakwaterError, Unavailable, from_answer

# The pause before the nth retry is BACKOFF * 2**n seconds, at most
# MAX_BACKOFF, with jitter.
BACKOFF = 0.25
MAX_BACKOFF = 4.0

# Failures after which the request surely did not reach the control plane.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# Failures after which it may have: safe to retry only idempotent calls.
_MAYBE_SENT = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)

_WRONG_PORT = (
    " (the answer was not HTTP/1.1: is this a Breakwater control plane? Its gRPC"
    " port answers JSON from this version on; its --http-listen port always does)"
)


def path(*segments: str) -> str:
    """An API path from its segments, each percent-encoded whole."""
    return "/" + "/".join(quote(str(s), safe="") for s in segments)


def with_query(p: str, query: Mapping[str, str] | None) -> str:
    """``p`` with ``query`` appended, each key and value percent-encoded:
    a space is ``%20``, never ``+`` (which the control plane takes as is)."""
    if not query:
        return p
    pairs = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())
    return f"{p}?{pairs}"


class Connection:
    """A sync and an async HTTP client to one control plane.

    ``url`` is the control plane's base URL, such as ``http://127.0.0.1:7070``
    (a path after the port is kept as a prefix). ``retries`` is how many
    times a failed call is sent again.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        timeout: float = 30,
        retries: int = 4,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{url!r} is not an http:// or https:// URL of the control plane"
            )
        self.url = url.rstrip("/")
        self.retries = max(0, retries)
        self._headers = {
            "accept": "application/json",
            "user-agent": f"breakwater-python/{__version__}",
        }
        if token:
            # A token read from a file often ends with a newline.
            self._headers["authorization"] = f"Bearer {token.strip()}"
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if ca_file else True
        )
        self._timeout = httpx.Timeout(timeout)
        self._client = httpx.Client(**self._options())
        # An httpx.AsyncClient belongs to the event loop that first used it,
        # so each loop gets its own (asyncio.run twice makes two loops).
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _options(self) -> dict[str, Any]:
        return {
            "base_url": self.url,
            "headers": self._headers,
            "timeout": self._timeout,
            "verify": self._verify,
        }

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._async is None or self._async_loop is not loop:
                self._async = httpx.AsyncClient(**self._options())
                self._async_loop = loop
            return self._async

    # -- one call ------------------------------------------------------------

    @staticmethod
    def _encode(body: Any) -> tuple[bytes | None, dict[str, str]]:
        if body is None:
            return None, {}
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return data.encode(), {"content-type": "application/json"}

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        """The JSON answer of a 2xx, or the error it stands for."""
        try:
            parsed = response.json() if response.content else None
        except ValueError:
            parsed = None
        if response.is_success:
            if not isinstance(parsed, dict):
                raise BreakwaterError(
                    f"{self.url} answered HTTP {response.status_code} with no JSON object:"
                    " is this a Breakwater control plane?",
                    status=response.status_code,
                )
            return parsed
        raise from_answer(response.status_code, parsed)

    def _pause(self, attempt: int, response: httpx.Response | None) -> float:
        """How long to wait before retry number ``attempt`` (0 first)."""
        if response is not None:
            # A 503 may say when to come back; honoured within MAX_BACKOFF.
            try:
                return min(MAX_BACKOFF, max(0.0, float(response.headers["retry-after"])))
            except (KeyError, ValueError):
                pass
        return min(MAX_BACKOFF, BACKOFF * 2.0**attempt) * random.uniform(0.5, 1.0)

    def _retryable(self, error: Exception, idempotent: bool) -> bool:
        return isinstance(error, _NEVER_SENT) or (idempotent and isinstance(error, _MAYBE_SENT))

    def _unreachable(self, error: Exception) -> Unavailable:
        hint = _WRONG_PORT if isinstance(error, httpx.RemoteProtocolError) else ""
        return Unavailable(f"cannot reach the control plane at {self.url}: {error}{hint}")

    def call(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """Sends one request (with retries) and answers its JSON object."""
        content, headers = self._encode(body)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._client.request(method, url, content=content, headers=headers)
            except httpx.TransportError as e:
                if last or not self._retryable(e, idempotent):
                    raise self._unreachable(e) from e
                time.sleep(self._pause(attempt, None))
                continue
            if response.status_code == 503 and not last:
                time.sleep(self._pause(attempt, response))
                continue
            return self._answer(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def acall(
        self,
        method: str,
        url: str,
        body: Any = None,
        *,
        idempotent: bool = True,
    ) -> dict[str, Any]:
        """The async :meth:`call`."""
        content, headers = self._encode(body)
        client = self._async_client()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await client.request(method, url, content=content, headers=headers)
            except httpx.TransportError as e:
                if last or not self._retryable(e, idempotent):
                    raise self._unreachable(e) from e
                await asyncio.sleep(self._pause(attempt, None))
                continue
            if response.status_code == 503 and not last:
                await asyncio.sleep(self._pause(attempt, response))
                continue
            return self._answer(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- streams of JSON lines ------------------------------------------------

    def _stream_request(self, client: httpx.Client | httpx.AsyncClient, url: str) -> httpx.Request:
        # Events may be minutes apart: only connecting is bounded.
        timeout = httpx.Timeout(self._timeout.connect, read=None, write=self._timeout.write)
        return client.build_request("GET", url, timeout=timeout)

    def _line(self, response: httpx.Response, line: str) -> dict[str, Any] | None:
        """One JSON line of a stream: its object, ``None`` for a blank line;
        a line that reports an error (``{"error": ...}``) raises it."""
        if not line.strip():
            return None
        try:
            value = json.loads(line)
        except ValueError as e:
            raise BreakwaterError(f"{self.url} sent a line that is not JSON: {line[:200]!r}") from e
        if not isinstance(value, dict):
            raise BreakwaterError(
                f"{self.url} sent a line that is not a JSON object: {line[:200]!r}"
            )
        if "error" in value:
            raise from_answer(response.status_code, value)
        return value

    def open_lines(self, url: str) -> httpx.Response:
        """Starts a GET whose answer is JSON lines; answers it once its
        status is 2xx (the caller reads and closes it)."""
        request = self._stream_request(self._client, url)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._client.send(request, stream=True)
            except httpx.TransportError as e:
                if last or not self._retryable(e, True):
                    raise self._unreachable(e) from e
                time.sleep(self._pause(attempt, None))
                continue
            if response.is_success:
                return response
            try:
                response.read()
            finally:
                response.close()
            if response.status_code == 503 and not last:
                time.sleep(self._pause(attempt, response))
                continue
            self._answer(response)  # raises: not a 2xx
        raise AssertionError("unreachable: the last attempt returns or raises")

    def lines(self, response: httpx.Response) -> Generator[dict[str, Any], None, None]:
        """The JSON objects of a stream from :meth:`open_lines`, until it ends;
        closes it."""
        try:
            for line in response.iter_lines():
                if (value := self._line(response, line)) is not None:
                    yield value
        except httpx.TransportError as e:
            raise Unavailable(f"the stream from {self.url} broke: {e}") from e
        finally:
            response.close()

    async def aopen_lines(self, url: str) -> httpx.Response:
        """The async :meth:`open_lines`."""
        client = self._async_client()
        request = self._stream_request(client, url)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as e:
                if last or not self._retryable(e, True):
                    raise self._unreachable(e) from e
                await asyncio.sleep(self._pause(attempt, None))
                continue
            if response.is_success:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            if response.status_code == 503 and not last:
                await asyncio.sleep(self._pause(attempt, response))
                continue
            self._answer(response)  # raises: not a 2xx
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def alines(self, response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        """The async :meth:`lines`."""
        try:
            async for line in response.aiter_lines():
                if (value := self._line(response, line)) is not None:
                    yield value
        except httpx.TransportError as e:
            raise Unavailable(f"the stream from {self.url} broke: {e}") from e
        finally:
            await response.aclose()

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Closes the sync client. An async client is closed by :meth:`aclose`."""
        self._client.close()

    async def aclose(self) -> None:
        """Closes the async client of the running loop, and the sync client."""
        with self._lock:
            client, loop = self._async, self._async_loop
            self._async = self._async_loop = None
        if client is not None and loop is asyncio.get_running_loop():
            await client.aclose()
        self._client.close()
