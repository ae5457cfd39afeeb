#!/usr/bin/env python3
"""MCP peer for sidecar tests, built on the official `mcp` SDK (2.x) streamable-HTTP transport.

  mcp_peer.py server --port P [--protocol-version V] [--json-response] [--retry-ms MS] [--verbose]
  mcp_peer.py client --url URL [--protocol-version V] [--header K:V]... STEP...

where each STEP is `list`, `call NAME [JSON_ARGS]` or `sleep SECONDS`; all steps
run in one connection (one session in the 2025 era) and each prints one JSON line.

The server serves both protocol eras on /mcp: 2025-11-25 (initialize handshake,
Mcp-Session-Id sessions, SSE resumable with Last-Event-ID) and 2026-07-28
(stateless, one POST per request, Mcp-Method header). --protocol-version makes
it refuse the other era with a JSON-RPC -32022 error. Tools: echo(text), fail(),
count(), slow(seconds, drop_stream=false). Besides the controls documented in
peer_http.py, POST /_expire_sessions makes every session issued so far answer
404, as for an expired session.

The client's --protocol-version is 2025-11-25 (initialize handshake),
2026-07-28 (no handshake, every request stateless) or auto (the SDK default:
probe server/discover, fall back to initialize).
"""

import argparse
import asyncio
import json
import sys

import anyio
import httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http import EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from peer_http import ControlledApp, json_response, respond, serve

LEGACY, MODERN = "2025-11-25", "2026-07-28"


class MemoryEventStore(EventStore):
    """Keeps every SSE event so a client can resume a stream with Last-Event-ID."""

    def __init__(self):
        self.events = []  # (event id, stream id, message or None for a priming event)

    async def store_event(self, stream_id, message):
        self.events.append((str(len(self.events) + 1), stream_id, message))
        return self.events[-1][0]

    async def replay_events_after(self, last_event_id, send_callback):
        index = int(last_event_id) if last_event_id.isdigit() else 0
        if not 0 < index <= len(self.events):
            return None
        stream_id = self.events[index - 1][1]
        for event_id, stream, message in self.events[index:]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


class SessionGate:
    """Answers 404 for expired sessions; with `only` set, refuses requests of the other protocol era."""

    def __init__(self, app, only):
        self.app, self.only = app, only
        self.issued, self.expired = set(), set()

    async def expire(self, query):
        self.expired |= self.issued
        return {"expired": len(self.expired)}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if headers.get("mcp-session-id") in self.expired:
            error = {"code": -32600, "message": "Session not found"}
            return await respond(send, *json_response(404, {"jsonrpc": "2.0", "id": None, "error": error}))
        version = headers.get("mcp-protocol-version")
        # The SDK routes the same way: no header or a handshake version means the 2025 era.
        modern = version is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS
        if self.only is not None and modern != (self.only in MODERN_PROTOCOL_VERSIONS):
            error = {"code": -32022, "message": f"this server only speaks {self.only}",
                     "data": {"supported": [self.only], "requested": version or "none"}}
            return await respond(send, *json_response(400, {"jsonrpc": "2.0", "id": None, "error": error}))

        async def track_sessions(event):
            if event["type"] == "http.response.start":
                self.issued.update(v.decode() for k, v in event["headers"] if k.lower() == b"mcp-session-id")
            await send(event)

        await self.app(scope, receive, track_sessions)


def build_server(args):
    stats = {"calls": 0, "idempotency_keys": []}
    mcp = MCPServer("mcp-peer", version="1.0.0", log_level="WARNING")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @mcp.tool()
    def fail() -> str:
        """Always fail with a tool error result (isError: true)."""
        raise ToolError("fail was called")

    @mcp.tool()
    def count(ctx: Context) -> int:
        """Increment a counter and return it, noting the Idempotency-Key header if present."""
        stats["calls"] += 1
        key = (ctx.headers or {}).get("idempotency-key")
        if key is not None:
            stats["idempotency_keys"].append(key)
        return stats["calls"]

    @mcp.tool()
    async def slow(seconds: float, ctx: Context, drop_stream: bool = False) -> str:
        """Sleep, reporting progress each second; drop_stream first closes the SSE stream (2025 era)."""
        if drop_stream:
            await ctx.close_sse_stream()
        done = 0.0
        while done < seconds:
            step = min(1.0, seconds - done)
            await anyio.sleep(step)
            done += step
            await ctx.report_progress(done, seconds)
        return f"slept {seconds}"

    sdk_app = mcp.streamable_http_app(
        json_response=args.json_response,
        event_store=MemoryEventStore(),
        retry_interval=args.retry_ms,
        # Requests may arrive through a proxy with its own Host header.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    gate = SessionGate(sdk_app, args.protocol_version)
    app = ControlledApp(gate, verbose=args.verbose)
    app.controls["/_expire_sessions"] = gate.expire
    app.extra_stats = stats
    return app


async def run_client(args):
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    mode = {"auto": "auto", LEGACY: "legacy"}.get(args.protocol_version, args.protocol_version)

    async def on_progress(progress, total, message):
        print(f"progress {progress}/{total}", file=sys.stderr, flush=True)

    timeout = httpx2.Timeout(30, read=300)  # the SDK's own defaults
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        transport = streamable_http_client(args.url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=args.timeout) as client:
            print(f"negotiated {client.protocol_version}", file=sys.stderr, flush=True)
            steps = list(args.steps)
            while steps:
                step = steps.pop(0)
                if step == "list":
                    result = await client.list_tools()
                    print(json.dumps([tool.name for tool in result.tools]), flush=True)
                elif step == "call":
                    name = steps.pop(0)
                    arguments = json.loads(steps.pop(0)) if steps and steps[0].startswith("{") else {}
                    # Progress is only requested from slow, so other calls carry no progressToken.
                    progress = on_progress if name == "slow" else None
                    result = await client.call_tool(name, arguments, progress_callback=progress)
                    print(json.dumps(result.model_dump(mode="json", by_alias=True, exclude_none=True)), flush=True)
                elif step == "sleep":
                    await anyio.sleep(float(steps.pop(0)))
                else:
                    raise ValueError(f"unknown step {step!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--protocol-version", choices=[LEGACY, MODERN], help="refuse the other era")
    server.add_argument("--json-response", action="store_true", help="answer with JSON instead of SSE")
    server.add_argument("--retry-ms", type=int, help="SSE retry field sent in priming events")
    server.add_argument("--verbose", action="store_true", help="log every request and response to stderr")
    client = modes.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--protocol-version", choices=["auto", LEGACY, MODERN], default="auto")
    client.add_argument("--header", action="append", default=[], metavar="K:V")
    client.add_argument("--timeout", type=float, help="seconds to wait for each response")
    client.add_argument("steps", nargs="+", help="list | call NAME [JSON_ARGS] | sleep SECONDS, repeatable")
    args = parser.parse_args()

    if args.mode == "server":
        return serve(build_server(args), args.port)
    try:
        asyncio.run(run_client(args))
    except BaseException as exc:  # anyio task groups wrap failures in exception groups
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        detail = f"MCPError {exc.code}: {exc.message}" if isinstance(exc, MCPError) else f"{type(exc).__name__}: {exc}"
        print(f"error: {detail}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
