"""Thin clients for the two supervisors' control sockets, so polling costs neither a process start.

nsinitd speaks JSON lines (supervisor/protocol.py); supervisord speaks XML-RPC over HTTP on a unix
socket (what supervisorctl uses). Both are polled the same way, at the same interval.
"""

from __future__ import annotations

import http.client
import itertools
import json
import selectors
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Iterable
from typing import Any


class CtlError(Exception):
    pass


class Ctl:
    """One connection to nsinitd; requests in turn."""

    _ids = itertools.count(1)

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, cmd: str, **args: Any) -> int:
        rid = next(self._ids)
        self.sock.sendall(json.dumps({"id": rid, "cmd": cmd, "args": args}).encode() + b"\n")
        return rid

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise CtlError("nsinitd closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, cmd: str, **args: Any) -> Any:
        rid = self.send(cmd, **args)
        while True:
            msg = self.read()
            if msg.get("id") != rid:
                continue
            if not msg.get("ok"):
                raise CtlError(f"{cmd}: {msg.get('error')}")
            return msg.get("result")

    def close(self) -> None:
        self.sock.close()


def concurrently(path: str, cmd: str, names: Iterable[str], timeout: float = 300.0,
                 connections: int = 64) -> dict[str, Any]:
    """`cmd` for every name, up to `connections` at once, each connection carrying one request at a
    time (the server runs each connection as its own task and answers a connection's requests in
    order; it also caps connections, at a quarter of its RLIMIT_NOFILE)."""
    todo = list(names)
    sel = selectors.DefaultSelector()
    conns: list[Ctl] = []
    replies: dict[str, Any] = {}

    def feed(c: Ctl) -> None:
        name = todo.pop()
        c.sock.send(json.dumps({"id": 1, "cmd": cmd, "args": {"name": name}}).encode() + b"\n")
        if c.sock in sel.get_map():
            sel.modify(c.sock, selectors.EVENT_READ, (c, name))
        else:
            sel.register(c.sock, selectors.EVENT_READ, (c, name))

    try:
        for _ in range(min(connections, len(todo))):
            c = Ctl(path, timeout)
            c.sock.setblocking(False)
            conns.append(c)
            feed(c)
        deadline = time.monotonic() + timeout
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise CtlError(f"{cmd}: replies missing after {timeout:.0f}s")
            for key, _ in sel.select(left):
                c, name = key.data
                chunk = c.sock.recv(1 << 16)
                if not chunk:
                    replies[name] = {"ok": False, "error": "closed"}
                    sel.unregister(c.sock)
                    continue
                c.buf += chunk
                if b"\n" in c.buf:
                    line, c.buf = c.buf.split(b"\n", 1)
                    replies[name] = json.loads(line)
                    if todo:
                        feed(c)
                    else:
                        sel.unregister(c.sock)
        return replies
    finally:
        for c in conns:
            c.close()
        sel.close()


class EventReader:
    """Reads JSON-line events (from `nsinitctl events -f`'s stdout, or from the socket itself) in a
    thread, stamping each line with the wall-clock time it arrived."""

    def __init__(self, stream: Any, raw: bool = False) -> None:
        self.stream = stream
        self.raw = raw
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for line in self.stream:
                t = time.time()
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict) and "item" in obj:
                    obj = obj["item"]
                if not isinstance(obj, dict) or "event" not in obj:
                    continue
                with self.cond:
                    self.events.append((t, obj))
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float) -> tuple[float, dict[str, Any]] | None:
        """The first event (from now on, in arrival order) that satisfies pred."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = getattr(self, "_cursor", 0)
            while True:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if pred(ev[1]):
                        self._cursor = i
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    self._cursor = i
                    return None
                self.cond.wait(left)

    def count(self, pred: Any) -> int:
        with self.cond:
            return sum(1 for _, e in self.events if pred(e))


def raw_event_stream(path: str) -> Any:
    """A file object of `{"id":..,"item":{event}}` lines straight from the socket."""
    c = Ctl(path, timeout=None)  # type: ignore[arg-type]
    c.send("events")
    return c.sock.makefile("rb")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTP(self.path, self.timeout)


def supervisord_rpc(path: str, timeout: float = 300.0) -> Any:
    """supervisord's XML-RPC interface over its unix socket (supervisor.getAllProcessInfo, ...)."""
    return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(path, timeout))
