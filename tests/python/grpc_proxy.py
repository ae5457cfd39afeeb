"""One unary call of the example Echo service with grpcio, to the target
given, through whatever proxy the environment names (`grpc_proxy`,
`https_proxy`, `http_proxy`): grpcio then opens a CONNECT tunnel. The
messages are encoded by hand (one bytes field, `payload = 1`), so no
generated stubs are needed. Prints the reply's payload, or the error."""

import json
import sys

import grpc


def main() -> None:
    target, payload = sys.argv[1], sys.argv[2].encode()
    request = b"\x0a" + bytes([len(payload)]) + payload
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary("/breakwater.echo.v1.Echo/Unary")
        try:
            reply = unary(request, timeout=10)
        except grpc.RpcError as error:
            print(json.dumps({"code": error.code().name, "details": error.details()}))
            return
    # The reply's first field is the payload: 0x0a, a one-byte length.
    assert reply[0] == 0x0A
    print(json.dumps({"code": "OK", "payload": reply[2 : 2 + reply[1]].decode()}))


if __name__ == "__main__":
    main()
