"""Clients for the control plane's checkpoints, dead letters and sagas,
over its JSON API.

    from breakwater import Client

    with Client("http://127.0.0.1:7070", token=TOKEN) as bw:
        put = bw.checkpoints.put("invoice-17", {"total": 12.5}, step="ocr", expected_version=0)
        latest = bw.checkpoints.get("invoice-17")
        for letter in bw.dead_letters.list(upstream="accounting"):
            bw.dead_letters.replay(letter.id)
        bw.sagas.start("signup.yaml")

:class:`AsyncClient` has the same groups with async methods (lists and
watches are async iterators).

Calls are retried as :mod:`breakwater._http` says: after a connection
failure or a 503, with a growing pause. A call whose repeat would not
answer what the first one did (a put, which adds a version; a delete,
prune or purge, which answer how many they removed; a replay, which sends
a request; an abort) is sent again only when it surely never arrived.
Gets, lists, and a saga's start (the same id starts one saga) are always
sent again.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import importlib
import json
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import httpx

from ._http import Connection, path, with_query

__all__ = [
    "AsyncClient",
    "AsyncWatch",
    "Checkpoint",
    "Client",
    "DeadLetter",
    "PutResult",
    "ReplayResult",
    "Watch",
]

T = TypeVar("T")

# A saga in one of these has ended: a watch of it ends too.
FINISHED = frozenset({"completed", "compensated", "failed", "aborted"})


# -- what the API answers ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PutResult:
    """A stored checkpoint version: its number, when it was written, and
    when its workflow expires (``None``: never)."""

    version: int
    created_at: dt.datetime | None
    expires_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One version of a workflow's checkpoint.

    ``state`` is the decoded JSON when the stored bytes are JSON, else the
    bytes (``b""`` for a put without state); ``state_bytes`` is always the
    bytes as stored.
    """

    workflow_id: str
    version: int
    step: str
    completed_steps: list[str]
    state: Any
    metadata: dict[str, str]
    created_at: dt.datetime | None
    expires_at: dt.datetime | None
    state_bytes: bytes = b""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A request that failed after every retry, as a sidecar (or a saga's
    compensation) left it.

    ``body`` is ``None`` when the letter was listed without bodies.
    ``sealed`` says whether it carries a sidecar's seal (see
    docs/control-plane.md, "Sealed letters").
    """

    id: str
    upstream: str
    source: str
    method: str
    uri: str
    headers: list[tuple[str, str]]
    body: bytes | None
    body_truncated: bool
    reason: str
    attempts: int
    grpc: bool
    failed_at: dt.datetime | None
    enqueued_at: dt.datetime | None
    replays: int
    last_replay_error: str
    last_replay_at: dt.datetime | None
    capture_id: str
    sealed: bool


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """How a replay went: ``delivered`` (the letter is gone), or the
    upstream's answer and why it failed again (the letter stays)."""

    delivered: bool
    status: int
    grpc_status: int
    error: str


def _time(text: Any) -> dt.datetime | None:
    """An RFC 3339 time from the API (``...Z``), or ``None``."""
    if not isinstance(text, str) or not text:
        return None
    # Python 3.10's fromisoformat does not take the "Z".
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _checkpoint(answer: Mapping[str, Any]) -> Checkpoint:
    raw = base64.b64decode(answer.get("state_base64") or "")
    if "state" in answer:
        state = answer["state"]
    elif raw.strip() == b"null":
        # JSON null: the API leaves "state" out for it.
        state = None
    else:
        state = raw
    return Checkpoint(
        workflow_id=answer["workflow_id"],
        version=answer["version"],
        step=answer.get("step", ""),
        completed_steps=list(answer.get("completed_steps", [])),
        state=state,
        metadata=dict(answer.get("metadata", {})),
        created_at=_time(answer.get("created_at")),
        expires_at=_time(answer.get("expires_at")),
        state_bytes=raw,
    )


def _letter(answer: Mapping[str, Any], with_body: bool = True) -> DeadLetter:
    return DeadLetter(
        id=str(answer.get("id", "")),
        upstream=answer.get("upstream", ""),
        source=answer.get("source", ""),
        method=answer.get("method", ""),
        uri=answer.get("uri", ""),
        headers=[(h["name"], h["value"]) for h in answer.get("headers", [])],
        body=base64.b64decode(answer.get("body_base64") or "") if with_body else None,
        body_truncated=bool(answer.get("body_truncated")),
        reason=answer.get("reason", ""),
        attempts=int(answer.get("attempts", 0)),
        grpc=bool(answer.get("grpc")),
        failed_at=_time(answer.get("failed_at")),
        enqueued_at=_time(answer.get("enqueued_at")),
        replays=int(answer.get("replays", 0)),
        last_replay_error=answer.get("last_replay_error", ""),
        last_replay_at=_time(answer.get("last_replay_at")),
        capture_id=answer.get("capture_id", ""),
        sealed=bool(answer.get("seal")),
    )


def _put_result(answer: Mapping[str, Any]) -> PutResult:
    return PutResult(
        version=answer["version"],
        created_at=_time(answer.get("created_at")),
        expires_at=_time(answer.get("expires_at")),
    )


def _replay_result(answer: Mapping[str, Any]) -> ReplayResult:
    return ReplayResult(
        delivered=bool(answer.get("delivered")),
        status=int(answer.get("status") or 0),
        grpc_status=int(answer.get("grpc_status") or 0),
        error=answer.get("error") or "",
    )


def _identity(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


# -- what the API is asked -----------------------------------------------------


class _Call(NamedTuple):
    """One request: its method, URL, JSON body, and whether sending it
    again after it may have arrived is harmless."""

    method: str
    url: str
    body: Any = None
    idempotent: bool = True


class _Pages(NamedTuple):
    """A paged list: its URL, its query, and the answer's key for the items."""

    url: str
    query: dict[str, str]
    key: str


def _ttl(ttl: float | str | dt.timedelta) -> str:
    """A TTL as the API reads it: ``"10m"`` as is, seconds as ``"30s"``."""
    if isinstance(ttl, str):
        return ttl
    if isinstance(ttl, dt.timedelta):
        ttl = ttl.total_seconds()
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
        raise ValueError(f"ttl must be seconds, a timedelta or text such as '10m', not {ttl!r}")
    if float(ttl).is_integer():
        return f"{int(ttl)}s"
    return f"{round(ttl * 1000)}ms"


def _checkpoint_path(workflow_id: str, *rest: str) -> str:
    return path("v1", "checkpoints", workflow_id, *rest)


def _put(
    workflow_id: str,
    state: Any,
    step: str,
    completed_steps: Iterable[str],
    metadata: Mapping[str, str] | None,
    ttl: float | str | dt.timedelta | None,
    expected_version: int | None,
) -> _Call:
    body: dict[str, Any] = {"step": step, "completed_steps": list(completed_steps)}
    if isinstance(state, (bytes, bytearray, memoryview)):
        body["state_base64"] = base64.b64encode(bytes(state)).decode("ascii")
    elif state is None:
        # "state": null would store no bytes at all; JSON null is "null".
        body["state_base64"] = base64.b64encode(b"null").decode("ascii")
    else:
        body["state"] = state
    if metadata:
        body["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    if ttl is not None:
        body["ttl"] = _ttl(ttl)
    if expected_version is not None:
        body["expected_version"] = expected_version
    return _Call("PUT", _checkpoint_path(workflow_id), body, idempotent=False)


def _get(workflow_id: str, version: int | None) -> _Call:
    query = {"version": str(version)} if version else None
    return _Call("GET", with_query(_checkpoint_path(workflow_id), query))


def _page_query(page_size: int | None, **rest: str | None) -> dict[str, str]:
    query = {k: v for k, v in rest.items() if v}
    if page_size:
        query["page_size"] = str(page_size)
    return query


def _letter_path(letter_id: str | int, *rest: str) -> str:
    return path("v1", "dead-letters", str(letter_id), *rest)


def _letters(upstream: str | None, with_bodies: bool, page_size: int | None) -> _Pages:
    query = _page_query(page_size, upstream=upstream)
    if not with_bodies:
        query["without_bodies"] = "true"
    return _Pages(path("v1", "dead-letters"), query, "letters")


def _enqueue(
    upstream: str,
    method: str,
    uri: str,
    body: bytes | str,
    headers: Iterable[tuple[str, str]] | Mapping[str, str],
    reason: str,
    capture_id: str,
) -> _Call:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    letter: dict[str, Any] = {
        "upstream": upstream,
        "method": method,
        "uri": uri,
        "headers": [{"name": n, "value": v} for n, v in pairs],
        "reason": reason,
    }
    if isinstance(body, str):
        letter["body"] = body
    else:
        letter["body_base64"] = base64.b64encode(body).decode("ascii")
    if capture_id:
        letter["capture_id"] = capture_id
    # With a capture id, a repeat answers the letter first stored.
    return _Call("POST", path("v1", "dead-letters"), letter, idempotent=bool(capture_id))


def _purge(query: dict[str, str]) -> _Call:
    return _Call("DELETE", with_query(path("v1", "dead-letters"), query), idempotent=False)


def _definition(definition: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A saga definition as a dict: given as one, or read from a YAML or
    JSON file (YAML needs PyYAML; without it only JSON files are read)."""
    if isinstance(definition, Mapping):
        return dict(definition)
    name = os.fspath(definition)
    with open(name, encoding="utf-8") as f:
        text = f.read()
    if name.endswith(".json"):
        value = json.loads(text)
    else:
        try:
            yaml: Any = importlib.import_module("yaml")
        except ImportError:
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ValueError(
                    f"{name}: reading YAML needs PyYAML (pip install pyyaml);"
                    " without it a definition must be JSON"
                ) from e
        else:
            value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise ValueError(f"{name}: a saga definition is a mapping (id, input, steps)")
    return value


def _saga_path(saga_id: str, *rest: str) -> str:
    return path("v1", "sagas", saga_id, *rest)


def _watch_url(saga_id: str | None) -> str:
    return with_query(_saga_path(saga_id) if saga_id else path("v1", "sagas"), {"watch": "true"})


# -- sync ----------------------------------------------------------------------


def _send(conn: Connection, c: _Call) -> dict[str, Any]:
    return conn.call(c.method, c.url, c.body, idempotent=c.idempotent)


def _walk(conn: Connection, pages: _Pages, parse: Callable[[dict[str, Any]], T]) -> Iterator[T]:
    """Every item of a paged list, a page at a time."""
    token = ""
    while True:
        query = {**pages.query, "page_token": token} if token else pages.query
        answer = conn.call("GET", with_query(pages.url, query))
        for item in answer.get(pages.key, []):
            yield parse(item)
        token = answer.get("next_page_token") or ""
        if not token:
            return


class Checkpoints:
    """``client.checkpoints``: a workflow's versions, put, read, pruned."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def put(
        self,
        workflow_id: str,
        state: Any,
        *,
        step: str = "",
        completed_steps: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        ttl: float | str | dt.timedelta | None = None,
        expected_version: int | None = None,
    ) -> PutResult:
        """Stores a new version and answers it once it is durable.

        ``state`` is any JSON value, or ``bytes`` stored as they are. ``ttl``
        (seconds, a ``timedelta`` or text such as ``"10m"``) expires the whole
        workflow that long after this put; without it the expiry is kept.
        With ``expected_version`` (``0``: the workflow must not exist) the
        put is a compare-and-swap: a lost race raises
        :class:`~breakwater.errors.VersionConflict` with ``current_version``.
        """
        c = _put(workflow_id, state, step, completed_steps, metadata, ttl, expected_version)
        return _put_result(_send(self._conn, c))

    def get(self, workflow_id: str, version: int | None = None) -> Checkpoint:
        """The latest version, or the given one (``NotFound`` if there is none)."""
        return _checkpoint(_send(self._conn, _get(workflow_id, version)))

    def history(self, workflow_id: str, *, page_size: int | None = None) -> Iterator[Checkpoint]:
        """Every version of a workflow, newest first, fetched ``page_size``
        at a time (the control plane's default: 50; at most 1000)."""
        pages = _Pages(
            _checkpoint_path(workflow_id, "history"), _page_query(page_size), "checkpoints"
        )
        return _walk(self._conn, pages, _checkpoint)

    def list(self, *, page_size: int | None = None) -> Iterator[Checkpoint]:
        """Every workflow's latest version, by workflow id (expired ones left out)."""
        pages = _Pages(path("v1", "checkpoints"), _page_query(page_size), "checkpoints")
        return _walk(self._conn, pages, _checkpoint)

    def delete(self, workflow_id: str) -> int:
        """Deletes a workflow and all its versions; answers how many there were
        (``NotFound`` for an unknown workflow)."""
        answer = self._conn.call("DELETE", _checkpoint_path(workflow_id), idempotent=False)
        return int(answer["deleted"])

    def prune(self, workflow_id: str, keep: int) -> int:
        """Keeps the newest ``keep`` versions (at least 1); answers how many
        were deleted."""
        url = _checkpoint_path(workflow_id, "prune")
        return int(self._conn.call("POST", url, {"keep": keep}, idempotent=False)["deleted"])


class DeadLetters:
    """``client.dead_letters``: the requests that failed after every retry."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def list(
        self,
        upstream: str | None = None,
        with_bodies: bool = False,
        *,
        page_size: int | None = None,
    ) -> Iterator[DeadLetter]:
        """Letters, oldest first, all or one upstream's; without their
        bodies (``body`` is ``None``) unless ``with_bodies``."""
        return _walk(
            self._conn,
            _letters(upstream, with_bodies, page_size),
            lambda a: _letter(a, with_bodies),
        )

    def show(self, letter_id: str | int) -> DeadLetter:
        """One letter, with its headers and body."""
        return _letter(self._conn.call("GET", _letter_path(letter_id)))

    def replay(self, letter_id: str | int, force: bool = False) -> ReplayResult:
        """Sends a letter again through its upstream (the control plane needs
        ``--config``); ``force`` sends even an unsealed or cut one."""
        url = with_query(_letter_path(letter_id, "replay"), {"force": "true"} if force else None)
        return _replay_result(self._conn.call("POST", url, idempotent=False))

    def purge(self, letter_id: str | int) -> int:
        """Removes one letter (``NotFound`` if there is none); answers 1."""
        answer = self._conn.call("DELETE", _letter_path(letter_id), idempotent=False)
        return int(answer["purged"])

    def purge_upstream(self, upstream: str) -> int:
        """Removes an upstream's letters; answers how many."""
        return int(_send(self._conn, _purge({"upstream": upstream}))["purged"])

    def purge_all(self) -> int:
        """Removes every letter; answers how many."""
        return int(_send(self._conn, _purge({"all": "true"}))["purged"])

    def enqueue(
        self,
        upstream: str,
        method: str,
        uri: str,
        *,
        body: bytes | str = b"",
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        reason: str = "",
        capture_id: str = "",
    ) -> DeadLetter:
        """Stores a letter by hand, as a sidecar does (it has no seal, so a
        replay of it needs ``force`` when the control plane checks seals).
        A ``capture_id`` already stored answers that letter instead."""
        c = _enqueue(upstream, method, uri, body, headers, reason, capture_id)
        return _letter(_send(self._conn, c))


class Watch:
    """A saga watch: iterate it for events (dicts: ``saga_id``, ``state``,
    ``step``, ``step_state``, ``message``, ``at``).

    The request is sent at ``with`` (or :meth:`open`, or the first
    iteration); from then on no event is missed. A watch of one saga
    begins with its current state and ends when the saga ends; a watch of
    all sagas ends only when the control plane stops or it is closed.
    Falling far behind raises :class:`~breakwater.errors.DataLoss`.
    """

    def __init__(self, conn: Connection, url: str) -> None:
        self._conn, self._url = conn, url
        self._response: httpx.Response | None = None
        self._events: Generator[dict[str, Any], None, None] | None = None

    def open(self) -> Watch:
        """Sends the request, if not yet sent, and answers the watch."""
        if self._events is None:
            self._response = self._conn.open_lines(self._url)
            self._events = self._conn.lines(self._response)
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        self.open()
        assert self._events is not None
        return next(self._events)

    def close(self) -> None:
        """Ends the watch."""
        # A generator never started does not run its cleanup: close both.
        if self._events is not None:
            self._events.close()
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> Watch:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Sagas:
    """``client.sagas``: start, read, watch and abort sagas."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def start(self, definition: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """Checks and starts a saga, given as a dict or as a YAML or JSON file
        (see docs/sagas.md); answers its record once durable. An id that
        exists answers that saga as it is, whatever the definition."""
        return self._conn.call("POST", path("v1", "sagas"), _definition(definition))

    def get(self, saga_id: str) -> dict[str, Any]:
        """A saga's record: its state, error, and each step's progress."""
        return self._conn.call("GET", _saga_path(saga_id))

    def list(
        self, state: str | None = None, *, page_size: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Sagas by id, all or those in one state (``running``, ``completed``,
        ``compensating``, ``compensated``, ``failed``, ``aborted``)."""
        pages = _Pages(path("v1", "sagas"), _page_query(page_size, state=state), "sagas")
        return _walk(self._conn, pages, _identity)

    def watch(self, saga_id: str | None = None) -> Watch:
        """Events of one saga until it ends, or of every saga from now on."""
        return Watch(self._conn, _watch_url(saga_id))

    def abort(self, saga_id: str, reason: str = "") -> dict[str, Any]:
        """Aborts a running saga: the step in flight finishes, then what was
        done is undone. ``FailedPrecondition`` if it has ended."""
        url = _saga_path(saga_id, "abort")
        return self._conn.call("POST", url, {"reason": reason}, idempotent=False)


class _Base:
    def __init__(
        self,
        url: str,
        token: str | None,
        ca_file: str | None,
        timeout: float,
        retries: int,
    ) -> None:
        self._conn = Connection(url, token, ca_file=ca_file, timeout=timeout, retries=retries)

    @property
    def url(self) -> str:
        """The control plane's URL."""
        return self._conn.url


class Client(_Base):
    """The control plane's checkpoints, dead letters and sagas.

    Args:
        url: The control plane's URL as the CLI takes it, such as
            ``http://127.0.0.1:7070`` (its gRPC port answers JSON too), or
            its JSON port (``--http-listen``).
        token: The bearer token: the operator's to change things, the
            read-only one to read.
        ca_file: A PEM file of the CA to trust for ``https://``.
        timeout: Seconds to wait for each HTTP request (a watch waits for
            events without bound).
        retries: How many times a call is sent again after a connection
            failure or a 503, with a growing pause (0.25 s, doubling, at
            most 4 s).
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
        super().__init__(url, token, ca_file, timeout, retries)
        self.checkpoints = Checkpoints(self._conn)
        self.dead_letters = DeadLetters(self._conn)
        self.sagas = Sagas(self._conn)

    def close(self) -> None:
        """Closes the HTTP connections."""
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- async ---------------------------------------------------------------------


async def _asend(conn: Connection, c: _Call) -> dict[str, Any]:
    return await conn.acall(c.method, c.url, c.body, idempotent=c.idempotent)


async def _awalk(
    conn: Connection, pages: _Pages, parse: Callable[[dict[str, Any]], T]
) -> AsyncIterator[T]:
    """The async :func:`_walk`."""
    token = ""
    while True:
        query = {**pages.query, "page_token": token} if token else pages.query
        answer = await conn.acall("GET", with_query(pages.url, query))
        for item in answer.get(pages.key, []):
            yield parse(item)
        token = answer.get("next_page_token") or ""
        if not token:
            return


class AsyncCheckpoints:
    """The async :class:`Checkpoints`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def put(
        self,
        workflow_id: str,
        state: Any,
        *,
        step: str = "",
        completed_steps: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        ttl: float | str | dt.timedelta | None = None,
        expected_version: int | None = None,
    ) -> PutResult:
        """See :meth:`Checkpoints.put`."""
        c = _put(workflow_id, state, step, completed_steps, metadata, ttl, expected_version)
        return _put_result(await _asend(self._conn, c))

    async def get(self, workflow_id: str, version: int | None = None) -> Checkpoint:
        """See :meth:`Checkpoints.get`."""
        return _checkpoint(await _asend(self._conn, _get(workflow_id, version)))

    def history(
        self, workflow_id: str, *, page_size: int | None = None
    ) -> AsyncIterator[Checkpoint]:
        """See :meth:`Checkpoints.history`."""
        pages = _Pages(
            _checkpoint_path(workflow_id, "history"), _page_query(page_size), "checkpoints"
        )
        return _awalk(self._conn, pages, _checkpoint)

    def list(self, *, page_size: int | None = None) -> AsyncIterator[Checkpoint]:
        """See :meth:`Checkpoints.list`."""
        pages = _Pages(path("v1", "checkpoints"), _page_query(page_size), "checkpoints")
        return _awalk(self._conn, pages, _checkpoint)

    async def delete(self, workflow_id: str) -> int:
        """See :meth:`Checkpoints.delete`."""
        answer = await self._conn.acall("DELETE", _checkpoint_path(workflow_id), idempotent=False)
        return int(answer["deleted"])

    async def prune(self, workflow_id: str, keep: int) -> int:
        """See :meth:`Checkpoints.prune`."""
        url = _checkpoint_path(workflow_id, "prune")
        answer = await self._conn.acall("POST", url, {"keep": keep}, idempotent=False)
        return int(answer["deleted"])


class AsyncDeadLetters:
    """The async :class:`DeadLetters`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def list(
        self,
        upstream: str | None = None,
        with_bodies: bool = False,
        *,
        page_size: int | None = None,
    ) -> AsyncIterator[DeadLetter]:
        """See :meth:`DeadLetters.list`."""
        return _awalk(
            self._conn,
            _letters(upstream, with_bodies, page_size),
            lambda a: _letter(a, with_bodies),
        )

    async def show(self, letter_id: str | int) -> DeadLetter:
        """See :meth:`DeadLetters.show`."""
        return _letter(await self._conn.acall("GET", _letter_path(letter_id)))

    async def replay(self, letter_id: str | int, force: bool = False) -> ReplayResult:
        """See :meth:`DeadLetters.replay`."""
        url = with_query(_letter_path(letter_id, "replay"), {"force": "true"} if force else None)
        return _replay_result(await self._conn.acall("POST", url, idempotent=False))

    async def purge(self, letter_id: str | int) -> int:
        """See :meth:`DeadLetters.purge`."""
        answer = await self._conn.acall("DELETE", _letter_path(letter_id), idempotent=False)
        return int(answer["purged"])

    async def purge_upstream(self, upstream: str) -> int:
        """See :meth:`DeadLetters.purge_upstream`."""
        return int((await _asend(self._conn, _purge({"upstream": upstream})))["purged"])

    async def purge_all(self) -> int:
        """See :meth:`DeadLetters.purge_all`."""
        return int((await _asend(self._conn, _purge({"all": "true"})))["purged"])

    async def enqueue(
        self,
        upstream: str,
        method: str,
        uri: str,
        *,
        body: bytes | str = b"",
        headers: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        reason: str = "",
        capture_id: str = "",
    ) -> DeadLetter:
        """See :meth:`DeadLetters.enqueue`."""
        c = _enqueue(upstream, method, uri, body, headers, reason, capture_id)
        return _letter(await _asend(self._conn, c))


class AsyncWatch:
    """The async :class:`Watch`: ``async with`` (or ``await w.open()``, or
    the first iteration) sends the request; ``async for`` reads events."""

    def __init__(self, conn: Connection, url: str) -> None:
        self._conn, self._url = conn, url
        self._response: httpx.Response | None = None
        self._events: AsyncGenerator[dict[str, Any], None] | None = None

    async def open(self) -> AsyncWatch:
        """Sends the request, if not yet sent, and answers the watch."""
        if self._events is None:
            self._response = await self._conn.aopen_lines(self._url)
            self._events = self._conn.alines(self._response)
        return self

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        await self.open()
        assert self._events is not None
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Ends the watch."""
        if self._events is not None:
            await self._events.aclose()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncWatch:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncSagas:
    """The async :class:`Sagas`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def start(self, definition: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """See :meth:`Sagas.start` (a file is read before the call)."""
        return await self._conn.acall("POST", path("v1", "sagas"), _definition(definition))

    async def get(self, saga_id: str) -> dict[str, Any]:
        """See :meth:`Sagas.get`."""
        return await self._conn.acall("GET", _saga_path(saga_id))

    def list(
        self, state: str | None = None, *, page_size: int | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """See :meth:`Sagas.list`."""
        pages = _Pages(path("v1", "sagas"), _page_query(page_size, state=state), "sagas")
        return _awalk(self._conn, pages, _identity)

    def watch(self, saga_id: str | None = None) -> AsyncWatch:
        """See :meth:`Sagas.watch`."""
        return AsyncWatch(self._conn, _watch_url(saga_id))

    async def abort(self, saga_id: str, reason: str = "") -> dict[str, Any]:
        """See :meth:`Sagas.abort`."""
        url = _saga_path(saga_id, "abort")
        return await self._conn.acall("POST", url, {"reason": reason}, idempotent=False)


class AsyncClient(_Base):
    """The async :class:`Client`: the same groups and arguments, with async
    methods. Close it with ``await aclose()`` or ``async with``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        timeout: float = 30,
        retries: int = 4,
    ) -> None:
        super().__init__(url, token, ca_file, timeout, retries)
        self.checkpoints = AsyncCheckpoints(self._conn)
        self.dead_letters = AsyncDeadLetters(self._conn)
        self.sagas = AsyncSagas(self._conn)

    async def aclose(self) -> None:
        """Closes the HTTP connections."""
        await self._conn.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
