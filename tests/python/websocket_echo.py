"""A WebSocket echo server and client, with the `websockets` library.

    websocket_echo.py server        prints its port, then echoes: first a
                                    JSON message of what the request
                                    carried, then every message back;
                                    /forbidden is refused 403
    websocket_echo.py client URL    prints one JSON object: what the server
                                    said first, and whether a text and a
                                    512 KiB binary message came back as sent
"""
import json
import os
import sys


def server():
    from websockets.sync.server import serve

    def process_request(connection, request):
        if request.path == "/forbidden":
            return connection.respond(403, "forbidden\n")
        return None

    def handler(websocket):
        request = websocket.request
        websocket.send(json.dumps({
            "path": request.path,
            "host": request.headers.get("Host"),
            "agent": request.headers.get("X-Agent"),
        }))
        for message in websocket:
            websocket.send(message)

    with serve(handler, "127.0.0.1", 0, process_request=process_request, max_size=None) as s:
        print(s.socket.getsockname()[1], flush=True)
        s.serve_forever()


def client(url):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers={"X-Agent": "invoice-7"}, max_size=None, open_timeout=10) as ws:
            first = json.loads(ws.recv(timeout=10))
            ws.send("hello")
            text = ws.recv(timeout=10)
            blob = os.urandom(512 << 10)
            ws.send(blob)
            back = ws.recv(timeout=10)
            print(json.dumps({"first": first, "text": text, "binary_equal": back == blob}))
    except InvalidStatus as e:
        print(json.dumps({"status": e.response.status_code}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server()
    else:
        client(sys.argv[2])
