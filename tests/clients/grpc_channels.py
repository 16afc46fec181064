#!/usr/bin/python3
"""gRPC C-core clients for socklb's tests (python3-grpcio, asyncio API, default options): N
channels to TARGET, each making a unary call every PERIOD_MS (staggered), never retrying. A
call that fails counts as failed, whatever the reason. Channels of one process to the same
target share one connection (C-core's global subchannel pool), as in any gRPC application;
several connections mean several processes.

Usage: grpc_channels.py TARGET N PERIOD_MS. Runs until its standard input closes, then prints
one JSON line: {"calls": n, "failed": n, "pods": {pod: calls}, "errors": [first few]}.
"""
import asyncio
import json
import sys

import grpc

target, channels, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) / 1000
result = {"calls": 0, "failed": 0, "pods": {}, "errors": []}


async def caller(i, done):
    channel = grpc.aio.insecure_channel(target)
    name = channel.unary_unary("/socklb.Pod/Name")
    await asyncio.sleep(period * i / channels)
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not done.is_set():
        try:
            pod = (await name(b"", timeout=5)).decode()
            result["calls"] += 1
            result["pods"][pod] = result["pods"].get(pod, 0) + 1
        except grpc.RpcError as e:
            result["failed"] += 1
            if len(result["errors"]) < 5:
                result["errors"].append(f"{e.code()}: {e.details()}")
        next_at += period
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await channel.close()


async def main():
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: sys.stdin.read() or done.set())
    print("started", flush=True)
    await asyncio.gather(*(caller(i, done) for i in range(channels)))


asyncio.run(main())
print(json.dumps(result), flush=True)
