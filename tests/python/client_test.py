"""breakwater.Client against a real control plane.

    client_test.py JSON_URL TOKEN [--participant UPSTREAM --failing UPSTREAM]
    client_test.py retry JSON_URL TOKEN [--puts N] [--interval SECONDS]
    client_test.py participant PORT

The first form checks the three APIs, one line per check, and exits 1 at
the first failure. The control plane must be fresh (its dead-letter queue
empty) and ask for TOKEN. Sagas run only with ``--participant`` and
``--failing``, two upstreams of the control plane's ``--config``: one that
answers 2xx to every request (the third form serves one), and one whose
calls all fail (nothing listening, or 5xx). Two, because failed calls
open an upstream's circuit, and the compensations must still get
through. Without them, starting a saga must be refused, and is.

``retry`` puts N checkpoints (40 by default) one after another, each a
compare-and-swap on the one before, alternating the sync and async
clients, while the control plane is restarted on the same port (by
whoever runs this, with SIGTERM: a put in flight when the control plane is
SIGKILLed may have arrived, so it is not sent again and fails). Every put
must succeed; the last line is a JSON summary.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import breakwater
from breakwater import AsyncClient, Client
from breakwater._http import Connection, path, with_query
from breakwater.errors import (
    BreakwaterError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthorized,
    VersionConflict,
)

FINISHED = {"completed", "compensated", "failed", "aborted"}


class CheckFailed(Exception):
    pass


def check(name: str, ok: bool, detail: str = "") -> None:
    """Prints a check that passed; one that failed ends the run with
    ``detail``."""
    if not ok:
        raise CheckFailed(f"{name}: {detail}")
    print(f"ok   {name}", flush=True)


def raises(name: str, cls: type[BaseException], call: Callable[[], Any]) -> BaseException:
    """Checks that ``call`` raises exactly ``cls`` (not a subclass)."""
    try:
        answer = call()
    except Exception as e:  # noqa: BLE001 (the check reports any other error)
        check(name, type(e) is cls, f"raised {type(e).__name__}: {e}")
        return e
    raise CheckFailed(f"{name}: raised nothing, answered {answer!r}")


# -- access ----------------------------------------------------------------------


def access(url: str, token: str) -> None:
    for name, wrong in (("no token", None), ("wrong token", token + "-wrong")):
        with Client(url, wrong, retries=0) as c:
            e = raises(f"{name} is Unauthorized", Unauthorized, lambda: c.checkpoints.get("x"))
            check(f"{name} answers 401", getattr(e, "status", 0) == 401, str(e))
            raises(
                f"{name} may not list letters", Unauthorized, lambda: list(c.dead_letters.list())
            )


# -- checkpoints -----------------------------------------------------------------


def checkpoints(c: Client, url: str, token: str, run: str) -> None:
    wf = f"client-test/{run}/order 42"  # a slash and a space, percent-encoded
    cp = c.checkpoints
    first = cp.put(
        wf,
        {"total": 12.5, "items": ["a"]},
        step="ocr",
        completed_steps=["scan"],
        metadata={"customer": "ann"},
        ttl="10m",
        expected_version=0,
    )
    check("put with expected_version=0 creates version 1", first.version == 1, str(first))
    check(
        "ttl sets expires_at",
        first.expires_at is not None
        and first.created_at is not None
        and 590 <= (first.expires_at - first.created_at).total_seconds() <= 610,
        f"{first.created_at} .. {first.expires_at}",
    )
    second = cp.put(wf, b"\xff\x00raw", step="validate", expected_version=1)
    check("a CAS put on the latest version wins", second.version == 2)
    e = raises(
        "a CAS put on an old version loses",
        VersionConflict,
        lambda: cp.put(wf, {}, expected_version=1),
    )
    check(
        "the conflict names the current version", getattr(e, "current_version", None) == 2, str(e)
    )
    e = raises(
        "expected_version=0 on an existing workflow loses",
        VersionConflict,
        lambda: cp.put(wf, {}, expected_version=0),
    )
    check("that conflict names the current version too", getattr(e, "current_version", None) == 2)

    latest = cp.get(wf)
    check("get answers the latest", latest.version == 2 and latest.step == "validate", str(latest))
    check(
        "bytes that are not JSON come back as bytes",
        latest.state == b"\xff\x00raw",
        repr(latest.state),
    )
    old = cp.get(wf, 1)
    check(
        "get of a version answers it whole",
        old.state == {"total": 12.5, "items": ["a"]}
        and old.completed_steps == ["scan"]
        and old.metadata == {"customer": "ann"}
        and old.workflow_id == wf,
        str(old),
    )
    raises("get of an unknown version is NotFound", NotFound, lambda: cp.get(wf, 99))
    raises(
        "get of an unknown workflow is NotFound",
        NotFound,
        lambda: cp.get(f"client-test/{run}/none"),
    )
    raises("a bad ttl is InvalidArgument", InvalidArgument, lambda: cp.put(wf, {}, ttl="soon"))

    for n in range(3, 6):
        cp.put(wf, {"n": n}, step=f"step-{n}", ttl=600)
    cp.put(wf, None, step="null state")
    check("a None state comes back as None", cp.get(wf).state is None)
    # Six versions: three pages of two.
    conn = Connection(url, token)
    page = conn.call(
        "GET", with_query(path("v1", "checkpoints", wf, "history"), {"page_size": "2"})
    )
    check(
        "history pages hold page_size checkpoints and a next token",
        len(page["checkpoints"]) == 2 and bool(page["next_page_token"]),
        f"{len(page['checkpoints'])} checkpoints, token {page['next_page_token']!r}",
    )
    conn.close()
    versions = [x.version for x in cp.history(wf, page_size=2)]
    check(
        "history(page_size=2) walks every page, newest first",
        versions == [6, 5, 4, 3, 2, 1],
        str(versions),
    )
    check(
        "history without page_size answers the same",
        [x.version for x in cp.history(wf)] == versions,
    )

    other = f"client-test/{run}/other"
    cp.put(other, {"x": 1})
    mine = {
        x.workflow_id: x.version
        for x in cp.list(page_size=1)
        if x.workflow_id.startswith(f"client-test/{run}/")
    }
    check("list() answers each workflow's latest", mine == {wf: 6, other: 1}, str(mine))

    check("prune(keep=2) answers how many it deleted", cp.prune(wf, 2) == 4)
    check("prune kept the newest two", [x.version for x in cp.history(wf)] == [6, 5])
    raises("prune(keep=0) is InvalidArgument", InvalidArgument, lambda: cp.prune(wf, 0))
    check("delete answers how many versions it deleted", cp.delete(wf) == 2)
    raises("a deleted workflow is NotFound", NotFound, lambda: cp.get(wf))
    raises("delete of an unknown workflow is NotFound", NotFound, lambda: cp.delete(wf))
    check("delete of the other workflow answers 1", cp.delete(other) == 1)

    async def async_checks() -> None:
        async with AsyncClient(url, token) as a:
            put = await a.checkpoints.put(wf, {"async": True}, expected_version=0)
            for _ in range(4):
                put = await a.checkpoints.put(wf, {"async": True}, expected_version=put.version)
            got = [x.version async for x in a.checkpoints.history(wf, page_size=2)]
            check("async history pages too", got == [5, 4, 3, 2, 1], str(got))
            try:
                await a.checkpoints.put(wf, {}, expected_version=2)
                raise CheckFailed("async CAS: no conflict")
            except VersionConflict as e:
                check("async CAS conflict names the current version", e.current_version == 5)
            check("async delete", await a.checkpoints.delete(wf) == 5)

    asyncio.run(async_checks())


# -- dead letters ----------------------------------------------------------------


def dead_letters(c: Client, run: str) -> None:
    dl = c.dead_letters
    letters = list(dl.list())
    check("the dead-letter queue starts empty", letters == [], f"{len(letters)} letters")
    check("purge_all of an empty queue answers 0", dl.purge_all() == 0)
    # Upstreams no policy file names: a replay is refused before it is sent.
    up1, up2 = f"client-test-{run}-a", f"client-test-{run}-b"
    one = dl.enqueue(
        up1,
        "POST",
        "/orders",
        body='{"id": 1}',
        headers={"idempotency-key": "k1"},
        reason="503",
        capture_id=f"{run}-1",
    )
    again = dl.enqueue(up1, "POST", "/orders", body="other", capture_id=f"{run}-1")
    check(
        "an enqueue with a stored capture_id answers the first letter",
        again.id == one.id and again.body == b'{"id": 1}',
    )
    two = dl.enqueue(up2, "PUT", "/blob", body=b"\x00\x01")
    three = dl.enqueue(up1, "DELETE", "/orders/1")
    ids = [one.id, two.id, three.id]
    # Pages of two: a page of one would end at letter 0, whose token the
    # control plane refuses (its page tokens must be above 0).
    listed = list(dl.list(page_size=2))
    check("list walks every page, oldest first", [x.id for x in listed] == ids, str(listed))
    check("list leaves bodies out by default", all(x.body is None for x in listed))
    bodies = [x.body for x in dl.list(with_bodies=True)]
    check(
        "list(with_bodies=True) has them",
        bodies == [b'{"id": 1}', b"\x00\x01", b""],
        str(bodies),
    )
    check("list(upstream=...) filters", [x.id for x in dl.list(upstream=up2)] == [two.id])
    shown = dl.show(one.id)
    check(
        "show answers the letter whole",
        shown.upstream == up1
        and shown.method == "POST"
        and shown.uri == "/orders"
        and shown.headers == [("idempotency-key", "k1")]
        and shown.reason == "503"
        and not shown.sealed,
        str(shown),
    )
    raises("show of an unknown letter is NotFound", NotFound, lambda: dl.show("999999"))
    e = raises(
        "a replay the control plane cannot send is FailedPrecondition",
        FailedPrecondition,
        lambda: dl.replay(one.id, force=True),
    )
    check("it says why", "--config" in str(e) or up1 in str(e), str(e))
    check("purge(id) answers 1", dl.purge(one.id) == 1)
    raises("purge of a purged letter is NotFound", NotFound, lambda: dl.purge(one.id))
    check("purge_upstream answers how many", dl.purge_upstream(up2) == 1)
    dl.enqueue(up2, "GET", "/b")
    check("purge_all answers how many", dl.purge_all() == 2)
    check("the queue is empty again", list(dl.list()) == [])


# -- sagas -----------------------------------------------------------------------


def until_finished(events: Any, saga_id: str) -> list[dict[str, Any]]:
    """The events of one saga from a watch, until it ends."""
    seen = []
    for event in events:
        if event["saga_id"] == saga_id:
            seen.append(event)
            if event["state"] in FINISHED:
                break
    return seen


def sagas(
    c: Client, url: str, token: str, run: str, participant: str | None, failing: str | None
) -> None:
    sg = c.sagas
    raises("get of an unknown saga is NotFound", NotFound, lambda: sg.get(f"{run}-none"))
    raises("watch of an unknown saga is NotFound", NotFound, lambda: list(sg.watch(f"{run}-none")))
    raises("abort of an unknown saga is NotFound", NotFound, lambda: sg.abort(f"{run}-none"))
    nowhere = f"client-test-{run}-nowhere"
    upstream, down = participant or nowhere, failing or nowhere

    def step(name: str, path_: str, upstream: str = upstream, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "action": {
                "upstream": upstream,
                "method": "POST",
                "path": path_,
                "body": {"saga": "{{saga.id}}"},
            },
            **more,
        }

    undo = {"upstream": upstream, "method": "DELETE", "path": "/orders/{{saga.id}}"}
    if participant is None or failing is None:
        try:
            sg.start({"id": f"{run}-refused", "steps": [step("a", "/orders")]})
        except (FailedPrecondition, InvalidArgument) as e:
            check(f"without --participant, a start is refused ({type(e).__name__})", True)
            print(
                "skip sagas: give --participant and --failing (upstreams of --config) to run them",
                flush=True,
            )
            return
        raise CheckFailed("a saga started without a participant")

    # Completed, from a file.
    ok_id = f"{run}-ok"
    definition = {
        "id": ok_id,
        "input": {"customer": "ann"},
        "steps": [step("reserve", "/orders", compensation=undo), step("charge", "/payments")],
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            yaml: Any = importlib.import_module("yaml")
            name = os.path.join(tmp, "saga.yaml")
            text = yaml.safe_dump(definition)
        except ImportError:
            name, text = os.path.join(tmp, "saga.json"), json.dumps(definition)
        with open(name, "w", encoding="utf-8") as f:
            f.write(text)
        started = sg.start(name)
    check(
        f"start from {os.path.basename(name)} answers the saga",
        started["id"] == ok_id and started["state"] == "running",
        started["state"],
    )
    events = list(sg.watch(ok_id))
    check(
        "a saga's watch ends when it does",
        events[-1]["state"] == "completed",
        str([e["state"] for e in events]),
    )
    done = sg.get(ok_id)
    check(
        "get: completed, every step succeeded",
        done["state"] == "completed"
        and [s["state"] for s in done["steps"]] == ["succeeded", "succeeded"],
        str(done["steps"]),
    )
    check(
        "starting the same id again answers that saga",
        sg.start(definition)["created_at"] == done["created_at"],
    )
    check(
        "list(state='completed') has it",
        ok_id in [s["id"] for s in sg.list(state="completed", page_size=1)],
    )
    raises(
        "abort of an ended saga is FailedPrecondition", FailedPrecondition, lambda: sg.abort(ok_id)
    )
    raises(
        "an invalid saga is InvalidArgument",
        InvalidArgument,
        lambda: sg.start({"id": f"{run}-bad", "steps": []}),
    )

    # Compensated, seen through a watch of every saga opened before it started.
    undo_id = f"{run}-undo"
    with sg.watch() as all_events:
        sg.start(
            {
                "id": undo_id,
                "steps": [
                    step("reserve", "/orders", compensation=undo),
                    step("charge", "/payments", down),
                ],
            }
        )
        seen = until_finished(all_events, undo_id)
    check(
        "a watch of all sagas sees a new one to its end",
        seen[-1]["state"] == "compensated",
        str([(e["state"], e.get("step")) for e in seen]),
    )
    steps = [s["state"] for s in sg.get(undo_id)["steps"]]
    check(
        "the done step was compensated, the failed one not",
        steps == ["compensated", "failed"],
        str(steps),
    )

    # Aborted while it waits to send a failing step again.
    abort_id = f"{run}-abort"
    sg.start(
        {
            "id": abort_id,
            "steps": [
                step("reserve", "/orders", compensation=undo),
                step("wait", "/payments", down, retry={"max_sends": 100, "interval": "1m"}),
            ],
        }
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        record = sg.get(abort_id)
        if record["steps"][1]["action"].get("next_send_at"):
            break
        time.sleep(0.05)
    check(
        "a saga waiting to send a step again is running",
        record["state"] == "running" and bool(record["steps"][1]["action"].get("next_send_at")),
        str(record["steps"][1]),
    )
    aborted = sg.abort(abort_id, reason="client test")
    check(
        "abort answers the saga",
        aborted["id"] == abort_id and aborted.get("abort_requested") is True,
        str(aborted.get("state")),
    )
    events = list(sg.watch(abort_id))
    final = sg.get(abort_id)
    check(
        "the aborted saga ends aborted, undone",
        events[-1]["state"] == "aborted" and final["steps"][0]["state"] == "compensated",
        str(final["steps"]),
    )

    async def async_checks() -> None:
        async with AsyncClient(url, token) as a:
            got = [e async for e in a.sagas.watch(abort_id)]
            check(
                "an async watch of an ended saga answers its state and ends",
                [e["state"] for e in got] == ["aborted"],
                str(got),
            )
            check("async get", (await a.sagas.get(undo_id))["state"] == "compensated")
            ids = [s["id"] async for s in a.sagas.list(page_size=1) if s["id"].startswith(run)]
            check(
                "async list walks every page", ids == sorted([ok_id, undo_id, abort_id]), str(ids)
            )

    asyncio.run(async_checks())


def main(url: str, token: str, participant: str | None, failing: str | None) -> None:
    run = uuid.uuid4().hex[:8]
    print(f"breakwater {breakwater.__version__} against {url} (run {run})", flush=True)
    access(url, token)
    with Client(url, token) as c:
        checkpoints(c, url, token, run)
        dead_letters(c, run)
        sagas(c, url, token, run, participant, failing)


# -- retries over a restart ------------------------------------------------------


def retry(url: str, token: str, puts: int, interval: float) -> None:
    """Puts across a restart: the client's retries must carry every one."""
    wf = f"client-retry/{uuid.uuid4().hex[:8]}"
    # Twelve retries wait 18 s or more in all: a restart of a few seconds is covered.
    sync = Client(url, token, retries=12, timeout=10)
    loop = asyncio.new_event_loop()
    aclient = AsyncClient(url, token, retries=12, timeout=10)
    durations = []
    started = time.monotonic()
    for i in range(1, puts + 1):
        t = time.monotonic()
        state = {"i": i}
        if i % 2:
            put = sync.checkpoints.put(wf, state, step=f"s{i}", expected_version=i - 1)
        else:
            put = loop.run_until_complete(
                aclient.checkpoints.put(wf, state, step=f"s{i}", expected_version=i - 1)
            )
        took = time.monotonic() - t
        durations.append(took)
        print(
            f"put {i}: version {put.version} in {took:.3f}s ({'sync' if i % 2 else 'async'})",
            flush=True,
        )
        if put.version != i:
            raise CheckFailed(f"put {i} answered version {put.version}")
        time.sleep(interval)
    versions = [x.version for x in sync.checkpoints.history(wf, page_size=1000)]
    if versions != list(range(puts, 0, -1)):
        raise CheckFailed(f"history is {versions}, not {puts}..1")
    deleted = sync.checkpoints.delete(wf)
    sync.close()
    loop.run_until_complete(aclient.aclose())
    loop.close()
    summary = {
        "puts": puts,
        "versions": len(versions),
        "deleted": deleted,
        "longest_put_s": round(max(durations), 3),
        "slow_puts": sum(d > 0.25 for d in durations),
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary), flush=True)


# -- a participant for sagas -----------------------------------------------------


def participant(port: int) -> None:
    """A saga participant that answers 201 and a new id to every request,
    and prints each one."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            status = 201
            key = self.headers.get("idempotency-key")
            print(f"{self.command} {self.path} {key} {body!r} -> {status}", flush=True)
            data = json.dumps({"id": uuid.uuid4().hex[:8], "path": self.path}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"participant on 127.0.0.1:{server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()


def option(args: list[str], name: str, default: str | None) -> str | None:
    if name in args:
        i = args.index(name)
        value = args[i + 1]
        del args[i : i + 2]
        return value
    return default


if __name__ == "__main__":
    args = sys.argv[1:]
    try:
        if args[:1] == ["participant"] and len(args) == 2:
            participant(int(args[1]))
        elif args[:1] == ["retry"]:
            rest = args[1:]
            puts = int(option(rest, "--puts", "40") or 40)
            interval = float(option(rest, "--interval", "0.1") or 0.1)
            if len(rest) != 2:
                raise SystemExit(__doc__)
            retry(rest[0], rest[1], puts, interval)
        else:
            rest = list(args)
            ok, failing = option(rest, "--participant", None), option(rest, "--failing", None)
            if len(rest) != 2 or (ok is None) != (failing is None):
                raise SystemExit(__doc__)
            main(rest[0], rest[1], ok, failing)
    except CheckFailed as e:
        print(f"FAIL {e}", flush=True)
        sys.exit(1)
    except BreakwaterError as e:
        print(f"FAIL {type(e).__name__}: {e}", flush=True)
        sys.exit(1)
