"""Shared plumbing for the peer servers: request counting, fault injection, traffic logging, serving.

`ControlledApp` wraps the SDK's ASGI app. Every POST that is not a control call
is counted by its JSON-RPC method and may be answered by an armed fault before
it reaches the SDK. Control endpoints (all accept GET or POST):

  /_stats                                   counters as JSON
  /_fail_next?status=503&count=1            next N POSTs get that HTTP status (plain-text body)
      [&method=tools/call] [&retry_after=2]   only POSTs with this JSON-RPC method; add Retry-After
  /_jsonrpc_error_next?code=-32603&count=1  next N requests get HTTP 200 with a JSON-RPC error
      [&method=...] [&message=...]            (notifications are never answered this way)
"""

import asyncio
import json
import sys
from collections import Counter
from urllib.parse import parse_qs

import uvicorn


def json_response(status, payload, headers=()):
    """An ASGI (start, body) pair for a JSON payload."""
    body = json.dumps(payload).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return {"type": "http.response.start", "status": status, "headers": head}, body


async def respond(send, start, body):
    await send(start)
    await send({"type": "http.response.body", "body": body})


def rpc_method(message):
    """The JSON-RPC method of a decoded POST body, or a placeholder for other shapes."""
    if isinstance(message, list):
        return "<batch>"
    if not isinstance(message, dict):
        return "<invalid>"
    if "method" in message:
        return message["method"]
    return "<response>" if "id" in message else "<invalid>"


class Fault:
    """A fault armed for the next `count` POSTs whose JSON-RPC method matches `method` (any if None)."""

    def __init__(self, query, **defaults):
        values = {**defaults, **{k: v[-1] for k, v in parse_qs(query).items()}}
        self.count = int(values.pop("count", 1))
        self.method = values.pop("method", None)
        self.values = values

    def take(self, method):
        if self.count <= 0 or (self.method is not None and self.method != method):
            return False
        self.count -= 1
        return True


class ControlledApp:
    def __init__(self, app, verbose=False):
        self.app = app
        self.verbose = verbose
        self.requests = Counter()  # JSON-RPC method -> POSTs that arrived
        self.http = Counter()  # HTTP method -> requests that arrived (control calls excluded)
        self.last_headers = {}  # JSON-RPC method -> headers of the latest such POST
        self.keys = {}  # JSON-RPC method -> the Idempotency-Key of each such POST (None: none)
        self.extra_stats = {}  # filled in by the script that owns this app
        self.fail = None
        self.rpc_error = None
        self.seq = 0
        self.controls = {
            "/_stats": self._stats,
            "/_fail_next": self._arm_fail,
            "/_jsonrpc_error_next": self._arm_rpc_error,
        }

    async def _stats(self, query):
        return {"requests": dict(self.requests), "http": dict(self.http),
                "last_headers": self.last_headers, "keys": self.keys, **self.extra_stats}

    async def _arm_fail(self, query):
        self.fail = Fault(query, status="503")
        return {"armed": "fail", "count": self.fail.count}

    async def _arm_rpc_error(self, query):
        self.rpc_error = Fault(query, code="-32603", message="injected JSON-RPC error")
        return {"armed": "jsonrpc_error", "count": self.rpc_error.count}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query = scope.get("query_string", b"").decode()
        control = self.controls.get(scope["path"])
        if control is not None:
            return await respond(send, *json_response(200, await control(query)))

        self.seq += 1
        tag = f"[{self.seq}]"
        body = b""
        while True:  # read the whole body so it can be inspected, then replay it below
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.verbose:
            log(f"{tag} --> {scope['method']} {scope['path']}{'?' + query if query else ''}",
                *(f"{k}: {v}" for k, v in headers.items()), body.decode(errors="replace"))
            send = self._logging_send(tag, send)
        self.http[scope["method"]] += 1

        if scope["method"] == "POST":
            try:
                message = json.loads(body)
            except ValueError:
                message = None
            method = rpc_method(message)
            self.requests[method] += 1
            self.last_headers[method] = headers
            self.keys.setdefault(method, []).append(headers.get("idempotency-key"))
            if self.fail is not None and self.fail.take(method):
                v = self.fail.values
                extra = [(b"retry-after", v["retry_after"].encode())] if "retry_after" in v else []
                text = b"injected failure\n"
                start = {"type": "http.response.start", "status": int(v["status"]),
                         "headers": [(b"content-type", b"text/plain"), *extra]}
                return await respond(send, start, text)
            has_id = isinstance(message, dict) and "id" in message
            if has_id and self.rpc_error is not None and self.rpc_error.take(method):
                v = self.rpc_error.values
                error = {"code": int(v["code"]), "message": v["message"]}
                return await respond(send, *json_response(200, {"jsonrpc": "2.0", "id": message["id"], "error": error}))

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the client to disconnect

        await self.app(scope, replay, send)

    @staticmethod
    def _logging_send(tag, send):
        async def logged(event):
            if event["type"] == "http.response.start":
                log(f"{tag} <-- {event['status']}",
                    *(f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in event.get("headers", [])))
            elif event["type"] == "http.response.body" and event.get("body"):
                log(f"{tag} <-- body", event["body"].decode(errors="replace"))
            await send(event)

        return logged


def log(first, *lines):
    print(first, *("    " + line for text in lines for line in text.splitlines()), sep="\n", file=sys.stderr, flush=True)


def serve(app, port):
    """Run `app` on 127.0.0.1:port and print "ready" (or "ready PORT" when port is 0) once listening."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():  # startup failed, e.g. the port is taken
                await task
                sys.exit(1)
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        print("ready" if port else f"ready {bound}", flush=True)
        await task

    asyncio.run(main())
