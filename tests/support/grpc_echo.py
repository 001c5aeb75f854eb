#!/usr/bin/python3
"""A gRPC server and client for tests/http2.rs, with grpcio's generic handlers (raw bytes, no
protoc code generation).

  grpc_echo.py serve PORT NAME   serves test.Echo on 127.0.0.1:PORT (h2c) until killed:
      Hello   unary: answers b"NAME:" + the request
      Count   server streaming: the request is a count N; answers N messages b"NAME:i"
      Fail    unary: ends the call with NOT_FOUND (grpc-status 5)
      Slow    unary: answers after 3 s
  grpc_echo.py call TARGET N     over ONE channel to TARGET: N Hello calls, one Count 5, one
      Fail, and prints a JSON object: who answered each Hello, the streamed messages, the
      Fail call's status code name.
  grpc_echo.py one TARGET METHOD  one unary call; prints {"code": NAME, "details": TEXT}.
"""
import json
import sys
import time
from concurrent import futures

import grpc


def serve(port, name):
    prefix = name.encode() + b":"

    def hello(request, context):
        return prefix + request

    def count(request, context):
        for i in range(int(request.decode())):
            yield prefix + str(i).encode()

    def fail(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def slow(request, context):
        time.sleep(3)
        return prefix + b"slow"

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Hello": grpc.unary_unary_rpc_method_handler(hello),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(target, n):
    with grpc.insecure_channel(target) as ch:
        hello = ch.unary_unary("/test.Echo/Hello")
        who = [hello(b"x%d" % i, timeout=10).decode().split(":")[0] for i in range(n)]
        streamed = [m.decode() for m in ch.unary_stream("/test.Echo/Count")(b"5", timeout=10)]
        try:
            ch.unary_unary("/test.Echo/Fail")(b"", timeout=10)
            failed = "OK"
        except grpc.RpcError as e:
            failed = e.code().name
    print(json.dumps({"who": who, "streamed": streamed, "fail": failed}))


def one(target, method):
    with grpc.insecure_channel(target) as ch:
        try:
            ch.unary_unary("/test.Echo/" + method)(b"", timeout=10)
            print(json.dumps({"code": "OK", "details": ""}))
        except grpc.RpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details()}))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "call":
        call(sys.argv[2], int(sys.argv[3]))
    else:
        one(sys.argv[2], sys.argv[3])
