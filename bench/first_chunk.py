"""How long the first chunk of a streamed (server-sent events) answer takes
to reach the caller, direct and through the sidecar.

    python3 bench/first_chunk.py [--sidecar target/release/breakwater] [--n 200]

One asyncio process runs the upstream and the caller, so both read the same
clock: the upstream sends the answer's headers, waits 20 ms (a model
thinking), notes the time and writes the first event; the caller notes when
that event arrives. The difference is the event's delivery time. Each of
`--n` requests, in turn, on one keep-alive connection per path. Prints one
JSON object: p50 and p99 in microseconds, direct and through the sidecar.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

THINK = 0.02


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def upstream(reader, writer, sent):
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # the caller closed its connection
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(THINK)
        event = b"data: {\"delta\": \"Hel\"}\n\n"
        sent.append(time.perf_counter())
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def measure(port, n, sent):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    delays = []
    body = b'{"model": "m", "stream": true}'
    for _ in range(n):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"\r\n")  # the first chunk's size line
        await reader.readuntil(b"\n\n")  # the event
        arrived = time.perf_counter()
        delays.append((arrived - sent[-1]) * 1e6)
        await reader.readuntil(b"0\r\n\r\n")
    writer.close()
    delays.sort()
    return {"p50_us": round(delays[len(delays) // 2]),
            "p99_us": round(delays[int(len(delays) * 0.99) - 1])}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sidecar", default="target/release/breakwater")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    sent = []
    server = await asyncio.start_server(
        lambda r, w: upstream(r, w, sent), "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    listen, admin = free_port(), free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"admin: {{listen: 127.0.0.1:{admin}}}\n"
                 f"proxy: {{listen: 127.0.0.1:{free_port()}}}\n"
                 f"upstreams:\n  llm: {{address: 127.0.0.1:{up}, listen: 127.0.0.1:{listen}}}\n")
    config.close()
    sidecar = subprocess.Popen([args.sidecar, "sidecar", "--threads", "1", "--config", config.name],
                               env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        direct = await measure(up, args.n, sent)
        through = await measure(listen, args.n, sent)
    finally:
        server.close()
        sidecar.terminate()
        sidecar.wait()
        os.unlink(config.name)
    print(json.dumps({"requests": args.n, "direct": direct, "sidecar": through,
                      "added_p50_us": through["p50_us"] - direct["p50_us"],
                      "added_p99_us": through["p99_us"] - direct["p99_us"]}))


asyncio.run(main())
