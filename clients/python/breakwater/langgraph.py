"""A LangGraph checkpointer that keeps a graph's threads in Breakwater's
control plane, over its JSON API (``/v1/threads/...``).

    from breakwater.langgraph import BreakwaterSaver

    with BreakwaterSaver("http://127.0.0.1:7070", token=TOKEN) as saver:
        graph = builder.compile(checkpointer=saver)
        graph.invoke(inputs, {"configurable": {"thread_id": "order-42"}})

The URL is the control plane's, as the ``breakwater`` CLI's
``--control-plane`` takes it (its gRPC port, ``--listen``, which serves
the JSON API to requests that are not gRPC), or its JSON port
(``--http-listen``): this client speaks JSON over HTTP/1.1 to either.

Values are serialized with LangGraph's own serializer (``serde``, by
default ``JsonPlusSerializer``) and sent as base64; metadata is sent as
JSON, so the control plane can filter on it. Channel versions are
zero-padded strings, as ``InMemorySaver`` makes them.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from ._http import Connection, path, with_query
from .errors import NotFound

__all__ = ["BreakwaterSaver"]

# What prune's strategies keep of each namespace: the newest one, or none.
_PRUNE_KEEP = {"keep_latest": 1, "delete": 0}
# The most checkpoints the control plane serves in one page.
_MAX_PAGE = 1000
_ONE_THREAD = (
    "BreakwaterSaver lists the checkpoints of one thread at a time: give a config with a thread_id"
)


class BreakwaterSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on Breakwater's control plane.

    Args:
        url: The control plane's URL, such as ``http://127.0.0.1:7070``
            (``https://`` when it serves TLS).
        token: The bearer token, if the control plane asks for one. The
            read-only token is enough for reading state; running a graph
            needs the operator token.
        ca_file: A PEM file of the CA to trust for ``https://``.
        serde: The serializer for checkpoints and values (LangGraph's
            default when ``None``).
        timeout: Seconds to wait for each HTTP request.
        retries: How many times a call is sent again after a connection
            failure or a 503, with a growing pause (a few seconds in all).

    Both the sync and the async methods are implemented. Close the saver
    with :meth:`close` (sync) or :meth:`aclose` (async), or use it as a
    context manager.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ca_file: str | None = None,
        serde: SerializerProtocol | None = None,
        timeout: float = 30,
        retries: int = 4,
    ) -> None:
        super().__init__(serde=serde)
        self._conn = Connection(url, token, ca_file=ca_file, timeout=timeout, retries=retries)

    @property
    def url(self) -> str:
        """The control plane's URL."""
        return self._conn.url

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Closes the HTTP connections of the sync methods."""
        self._conn.close()

    async def aclose(self) -> None:
        """Closes the HTTP connections of both the async and the sync methods."""
        await self._conn.aclose()

    def __enter__(self) -> BreakwaterSaver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> BreakwaterSaver:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- values in and out -------------------------------------------------------

    def _dump(self, value: Any) -> dict[str, str]:
        """A value as the API carries it: its serializer type and base64 bytes."""
        type_, data = self.serde.dumps_typed(value)
        return {"type": type_, "data_base64": base64.b64encode(data).decode("ascii")}

    def _load(self, typed: Mapping[str, Any]) -> Any:
        data = base64.b64decode(typed.get("data_base64") or "")
        return self.serde.loads_typed((typed["type"], data))

    def _tuple(self, answer: Mapping[str, Any]) -> CheckpointTuple:
        """A checkpoint tuple from the control plane's checkpoint object."""
        checkpoint: Checkpoint = self._load(answer["checkpoint"])
        checkpoint["channel_values"] = {
            blob["channel"]: self._load(blob) for blob in answer["channel_values"]
        }
        configurable = {
            "thread_id": answer["thread_id"],
            "checkpoint_ns": answer["checkpoint_ns"],
            "checkpoint_id": answer["checkpoint_id"],
        }
        parent = answer.get("parent_checkpoint_id")
        return CheckpointTuple(
            config={"configurable": configurable},
            checkpoint=checkpoint,
            metadata=answer["metadata"],
            parent_config=(
                {"configurable": {**configurable, "checkpoint_id": parent}} if parent else None
            ),
            # The control plane answers them in (task_path, task_id, idx)
            # order, which LangGraph's replay of delta channels relies on.
            pending_writes=[
                (w["task_id"], w["channel"], self._load(w)) for w in answer["pending_writes"]
            ],
        )

    # -- requests ----------------------------------------------------------------

    @staticmethod
    def _thread(thread_id: Any, *rest: str) -> str:
        return path("v1", "threads", str(thread_id), *rest)

    def _get_url(self, config: RunnableConfig) -> str:
        conf = config["configurable"]
        query = {"checkpoint_ns": conf.get("checkpoint_ns") or ""}
        if checkpoint_id := get_checkpoint_id(config):
            query["checkpoint_id"] = checkpoint_id
        return with_query(self._thread(conf["thread_id"]), query)

    def _put_request(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[str, dict[str, Any], RunnableConfig]:
        """The URL and body of a put, and the config the put answers."""
        conf = config["configurable"]
        thread_id = conf["thread_id"]
        ns = conf.get("checkpoint_ns") or ""
        rest: dict[str, Any] = dict(checkpoint)
        values: dict[str, Any] = rest.pop("channel_values")
        # A blob for each channel whose version moved; an "empty" one for a
        # channel with a version but no value here (such as a DeltaChannel
        # between snapshots). Unchanged channels keep their stored blobs.
        blobs = []
        for channel, version in new_versions.items():
            blob = {"channel": channel, "version": str(version)}
            blob.update(
                self._dump(values[channel])
                if channel in values
                else {"type": "empty", "data_base64": ""}
            )
            blobs.append(blob)
        body = {
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint["id"],
            # The config names the checkpoint this one follows, if any.
            "parent_checkpoint_id": conf.get("checkpoint_id") or "",
            "checkpoint": self._dump(rest),
            "metadata": get_serializable_checkpoint_metadata(config, metadata),
            "channel_versions": {k: str(v) for k, v in checkpoint["channel_versions"].items()},
            "blobs": blobs,
        }
        answer: RunnableConfig = {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": ns,
                "checkpoint_id": checkpoint["id"],
            }
        }
        return self._thread(thread_id), body, answer

    def _writes_request(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> tuple[str, dict[str, Any]]:
        conf = config["configurable"]
        return self._thread(conf["thread_id"], "writes"), {
            "checkpoint_ns": conf.get("checkpoint_ns") or "",
            "checkpoint_id": conf["checkpoint_id"],
            "writes": [
                {
                    "task_id": task_id,
                    # Special channels (errors, interrupts...) have negative
                    # indexes: stored once per task, replaced when sent again.
                    "idx": WRITES_IDX_MAP.get(channel, idx),
                    "channel": channel,
                    "task_path": task_path,
                    **self._dump(value),
                }
                for idx, (channel, value) in enumerate(writes)
            ],
        }

    @staticmethod
    def _history_query(
        config: RunnableConfig, filter: dict[str, Any] | None, before: RunnableConfig | None
    ) -> dict[str, str]:
        conf = config["configurable"]
        query: dict[str, str] = {}
        # No namespace in the config: every namespace of the thread.
        if conf.get("checkpoint_ns") is not None:
            query["checkpoint_ns"] = conf["checkpoint_ns"]
        if before is not None and (before_id := get_checkpoint_id(before)):
            query["before"] = before_id
        if filter:
            query["filter"] = json.dumps(filter, separators=(",", ":"), allow_nan=False)
        return query

    @staticmethod
    def _page(query: dict[str, str], left: int | None, token: str) -> dict[str, str]:
        page = dict(query, page_size=str(min(left or _MAX_PAGE, _MAX_PAGE)))
        if token:
            page["page_token"] = token
        return page

    @staticmethod
    def _matches(
        t: CheckpointTuple, filter: dict[str, Any] | None, before: RunnableConfig | None
    ) -> bool:
        """Whether one checkpoint passes list's `before` and `filter`."""
        if before is not None and (before_id := get_checkpoint_id(before)):
            if t.config["configurable"]["checkpoint_id"] >= before_id:
                return False
        return all(t.metadata.get(k) == v for k, v in (filter or {}).items())

    @staticmethod
    def _keep(strategy: str) -> int:
        if strategy not in _PRUNE_KEEP:
            raise ValueError(f"unknown prune strategy {strategy!r}: use keep_latest or delete")
        return _PRUNE_KEEP[strategy]

    # -- sync ----------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint the config names, or its namespace's newest; ``None``
        when there is none."""
        try:
            return self._tuple(self._conn.call("GET", self._get_url(config)))
        except NotFound:
            return None

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """A thread's checkpoints, newest first: those of the config's
        namespace, or of every namespace when the config has none."""
        if config is None:
            raise ValueError(_ONE_THREAD)
        if get_checkpoint_id(config):
            # One checkpoint named: at most that one.
            t = self.get_tuple(config)
            if t is not None and self._matches(t, filter, before) and (limit is None or limit > 0):
                yield t
            return
        query = self._history_query(config, filter, before)
        url = self._thread(config["configurable"]["thread_id"], "history")
        left, token = limit, ""
        while left is None or left > 0:
            answer = self._conn.call("GET", with_query(url, self._page(query, left, token)))
            items = answer["checkpoints"][:left] if left is not None else answer["checkpoints"]
            for item in items:
                yield self._tuple(item)
            if left is not None:
                left -= len(items)
            # A page may be short, even empty, and still have a next one.
            token = answer.get("next_page_token") or ""
            if not token:
                return

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Stores a checkpoint and the values of the channels in ``new_versions``."""
        url, body, answer = self._put_request(config, checkpoint, metadata, new_versions)
        self._conn.call("PUT", url, body)
        return answer

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Stores a task's writes against the config's checkpoint."""
        url, body = self._writes_request(config, writes, task_id, task_path)
        self._conn.call("POST", url, body)

    def delete_thread(self, thread_id: str) -> None:
        """Deletes a thread: every namespace, checkpoint and write."""
        self._conn.call("DELETE", self._thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Deletes the checkpoints (and their writes) whose metadata ``run_id``
        is one of these, in every thread."""
        for run_id in run_ids:
            self._conn.call("DELETE", path("v1", "runs", str(run_id)))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copies every checkpoint and write of a thread to a thread that has
        none (else :class:`~breakwater.errors.FailedPrecondition`)."""
        self._conn.call(
            "POST",
            self._thread(source_thread_id, "copy"),
            {"target_thread_id": str(target_thread_id)},
            idempotent=False,
        )

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``keep_latest`` keeps the newest checkpoint of each namespace of each
        thread; ``delete`` deletes the threads. Like the base contract's
        ``keep_latest``, this drops the history a ``DeltaChannel`` is rebuilt
        from."""
        keep = self._keep(strategy)
        for thread_id in thread_ids:
            self._conn.call("POST", self._thread(thread_id, "prune"), {"keep": keep})

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The version after ``current``: a zero-padded counter and a random
        fraction, which compare in order as strings."""
        if current is None:
            n = 0
        elif isinstance(current, int):
            n = current
        else:
            n = int(current.split(".")[0])
        return f"{n + 1:032}.{random.random():016}"

    # -- async ---------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The async :meth:`get_tuple`."""
        try:
            return self._tuple(await self._conn.acall("GET", self._get_url(config)))
        except NotFound:
            return None

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """The async :meth:`list`."""
        if config is None:
            raise ValueError(_ONE_THREAD)
        if get_checkpoint_id(config):
            t = await self.aget_tuple(config)
            if t is not None and self._matches(t, filter, before) and (limit is None or limit > 0):
                yield t
            return
        query = self._history_query(config, filter, before)
        url = self._thread(config["configurable"]["thread_id"], "history")
        left, token = limit, ""
        while left is None or left > 0:
            answer = await self._conn.acall("GET", with_query(url, self._page(query, left, token)))
            items = answer["checkpoints"][:left] if left is not None else answer["checkpoints"]
            for item in items:
                yield self._tuple(item)
            if left is not None:
                left -= len(items)
            token = answer.get("next_page_token") or ""
            if not token:
                return

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """The async :meth:`put`."""
        url, body, answer = self._put_request(config, checkpoint, metadata, new_versions)
        await self._conn.acall("PUT", url, body)
        return answer

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """The async :meth:`put_writes`."""
        url, body = self._writes_request(config, writes, task_id, task_path)
        await self._conn.acall("POST", url, body)

    async def adelete_thread(self, thread_id: str) -> None:
        """The async :meth:`delete_thread`."""
        await self._conn.acall("DELETE", self._thread(thread_id))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """The async :meth:`delete_for_runs`."""
        for run_id in run_ids:
            await self._conn.acall("DELETE", path("v1", "runs", str(run_id)))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """The async :meth:`copy_thread`."""
        await self._conn.acall(
            "POST",
            self._thread(source_thread_id, "copy"),
            {"target_thread_id": str(target_thread_id)},
            idempotent=False,
        )

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """The async :meth:`prune`."""
        keep = self._keep(strategy)
        for thread_id in thread_ids:
            await self._conn.acall("POST", self._thread(thread_id, "prune"), {"keep": keep})
