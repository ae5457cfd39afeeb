#!/usr/bin/env python3
"""A2A v1.0 peer for sidecar tests, built on the official `a2a-sdk` JSON-RPC binding.

  a2a_peer.py server --port P [--public-url URL] [--verbose]
  a2a_peer.py client --url URL [--header K:V]... [--resolve-card] send TEXT | stream TEXT | get TASK_ID

The server answers JSON-RPC on POST / and serves its agent card on
GET /.well-known/agent-card.json. Its agent echoes the message text back as a
completed task (an artifact plus a final status message). Control endpoints
(/_stats, /_fail_next, /_jsonrpc_error_next) are described in peer_http.py.

The client talks JSON-RPC to --url directly, using a card built locally, so no
card request goes over the wire; --resolve-card fetches the card from --url
first and then uses the interface URL the card names (see --public-url).
`send` uses SendMessage, `stream` SendStreamingMessage (SSE), `get` GetTask.
Each prints one JSON line: {"id", "contextId", "state", "text"}.
"""

import argparse
import asyncio
import json
import sys
import uuid

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.helpers import get_artifact_text, get_message_text, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (AgentCapabilities, AgentCard, AgentInterface, AgentSkill, GetTaskRequest, Message, Part,
                       Role, SendMessageRequest, TaskState)
from starlette.applications import Starlette

from peer_http import ControlledApp, serve


class EchoExecutor(AgentExecutor):
    """Completes every task at once, echoing the user's text as an artifact and as the final message."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = context.get_user_input()
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.add_artifact([Part(text=text)], name="echo")
        await updater.complete(updater.new_agent_message([Part(text=text)]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def agent_card(url, streaming=True):
    return AgentCard(
        name="a2a-peer",
        description="Echoes the message text back as a completed task.",
        version="1.0.0",
        supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=streaming),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="echo", name="echo", description="Echo the text back.", tags=["test"])],
    )


def build_server(args):
    card = agent_card(args.public_url or f"http://127.0.0.1:{args.port}/")
    handler = DefaultRequestHandler(agent_executor=EchoExecutor(), task_store=InMemoryTaskStore(), agent_card=card)
    routes = create_agent_card_routes(card) + create_jsonrpc_routes(handler, rpc_url="/")
    return ControlledApp(Starlette(routes=routes), verbose=args.verbose)


def summary(task):
    """The task id, state and echoed text (artifact text, else the final status message)."""
    text = "".join(get_artifact_text(a) for a in task.artifacts) or get_message_text(task.status.message)
    return {"id": task.id, "contextId": task.context_id, "state": TaskState.Name(task.status.state), "text": text}


async def run_client(args):
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        config = ClientConfig(streaming=args.action == "stream", httpx_client=http)
        factory = ClientFactory(config)
        if args.resolve_card:
            client = await factory.create_from_url(args.url)
        else:
            client = factory.create(agent_card(args.url))
        if args.action == "get":
            task = await client.get_task(GetTaskRequest(id=args.arg))
            print(json.dumps(summary(task)))
            return
        message = Message(role=Role.ROLE_USER, message_id=str(uuid.uuid4()), parts=[Part(text=args.arg)])
        task = None
        async for response in client.send_message(SendMessageRequest(message=message)):
            kind = response.WhichOneof("payload")
            if args.action == "stream":
                print(f"event {kind}", file=sys.stderr, flush=True)
            if kind == "task":
                task = response.task
            elif kind == "status_update" and task is not None:
                task.status.CopyFrom(response.status_update.status)
            elif kind == "artifact_update" and task is not None:
                task.artifacts.append(response.artifact_update.artifact)
        print(json.dumps(summary(task)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    server = modes.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--public-url", help="JSON-RPC URL named in the agent card (default: this server)")
    server.add_argument("--verbose", action="store_true", help="log every request and response to stderr")
    client = modes.add_parser("client")
    client.add_argument("--url", required=True, help="JSON-RPC endpoint, e.g. http://127.0.0.1:P/")
    client.add_argument("--header", action="append", default=[], metavar="K:V")
    client.add_argument("--resolve-card", action="store_true", help="fetch the agent card from --url first")
    client.add_argument("action", choices=["send", "stream", "get"])
    client.add_argument("arg", help="message text, or the task id for get")
    args = parser.parse_args()

    if args.mode == "server":
        return serve(build_server(args), args.port)
    try:
        asyncio.run(run_client(args))
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
