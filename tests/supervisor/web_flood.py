"""A flood of HTTP requests on nsinitd's web server, from a process of its own: the test that
times nsinitd's answers meanwhile must not share an interpreter (and its GIL) with the flood.

    python -m tests.supervisor.web_flood PORT CLIENTS PATH...

CLIENTS keep-alive connections each ask for the PATHs in turn (client i starts at PATH i), each
request as soon as the previous answer is in. Prints ``on`` once every client has had an answer;
when stdin ends, stops and prints one JSON line: ``{"statuses": {STATUS: COUNT}, "times": [...]}``,
the time.monotonic() of each answer (the clock is the same in every process).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

import trio


async def ask_again_and_again(port: int, paths: list[str], first: int, statuses: Counter[int],
                              times: list[float], answered_once: trio.Semaphore) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        buf, i, counted = b"", first, False
        while True:
            path = paths[i % len(paths)]
            i += 1
            await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"the server closed a connection asking for {path}")
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
            while len(buf) < length:
                buf += await stream.receive_some(65536)
            buf = buf[length:]
            statuses[int(lines[0].split(b" ")[1])] += 1
            times.append(time.monotonic())
            if not counted:
                counted = True
                answered_once.release()


async def main(port: int, clients: int, paths: list[str]) -> None:
    statuses: Counter[int] = Counter()
    times: list[float] = []
    answered_once = trio.Semaphore(clients, max_value=clients)
    for _ in range(clients):
        await answered_once.acquire()
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(ask_again_and_again, port, paths, i, statuses, times, answered_once)
        for _ in range(clients):
            await answered_once.acquire()
        print("on", flush=True)
        await trio.wrap_file(sys.stdin).read()
        nursery.cancel_scope.cancel()
    print(json.dumps({"statuses": statuses, "times": times}), flush=True)


if __name__ == "__main__":
    # The flood's own work (making and parsing requests) is a remote client's, done on another
    # machine's CPU: here it yields the CPU to nsinitd, whose answers are what is measured. It
    # still keeps every client's request waiting at nsinitd at all times.
    os.nice(10)
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
