#!/usr/bin/python3
"""A gRPC pod for socklb's tests: a unary method /socklb.Pod/Name that answers with the pod's
name, on ADDRESS:PORT (generic handlers: no generated code needed).

Usage: grpc_pod.py NAME ADDRESS PORT. Prints "ready" once it listens; ends on SIGTERM or when
its standard input closes.
"""
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

name, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def call(request, context):
    return name.encode()


handler = grpc.method_handlers_generic_handler(
    "socklb.Pod", {"Name": grpc.unary_unary_rpc_method_handler(call)}
)
server = grpc.server(ThreadPoolExecutor(8))
server.add_generic_rpc_handlers((handler,))
host = f"[{address}]" if ":" in address else address
if server.add_insecure_port(f"{host}:{port}") == 0:
    sys.exit(f"cannot listen on {host}:{port}")
server.start()
print("ready", flush=True)
signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
threading.Thread(target=lambda: (sys.stdin.read(), server.stop(0)), daemon=True).start()
server.wait_for_termination()
