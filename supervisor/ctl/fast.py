"""``nsinitctl [-s SOCKET] status [NAME...]``, the question asked most, without the full client.

The full client imports argparse, json, re, pathlib, datetime, dataclasses and the protocol's
records and enums: about 35 ms before the first byte is sent, three times what the interpreter
itself takes to start. This path reads that one command line by hand, sends the one request over
a blocking socket, and prints the table the full path prints, byte for byte
(tests/supervisor/test_ctl.py compares them). It gives up on anything else and returns None, and
:func:`supervisor.ctl.main` runs the full path: another option or command, ``--json``, a socket it
can't connect to at once, an error reply, a malformed or oversized answer, a named program that is
unknown or not RUNNING (the full path says so and picks the exit status). Asking for the status
twice changes nothing on the daemon's side.

Imports: the interpreter's own modules, ``_socket`` and nsruntime.lean's JSON (already loaded by
the ``supervisor`` package, which takes its version from nsruntime).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from nsruntime import json_loads as loads
from supervisor.ctl.table import status_lines

DEFAULT_SOCKET = "/run/nsinit/nsinitd.sock"
QUICK_TIMEOUT = 10.0  # a request answered from the daemon's memory (status, pid, logs, ...)
# the full path enforces supervisor.protocol.MAX_RESPONSE_BYTES; past it, this one gives up
MAX_ANSWER = 16 * 1024 * 1024
_REQUEST = b'{"id":1,"cmd":"status","args":{}}\n'


def parse(argv: list[str]) -> tuple[str, list[str]] | None:
    """(socket, names) of ``[-s|--socket SOCKET]... status [NAME...]`` with -s anywhere; None for
    anything else (the full path's argparse reads every other command line)."""
    sock, names, command = DEFAULT_SOCKET, [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-s", "--socket"):
            if i + 1 == len(argv) or argv[i + 1].startswith("-") or not argv[i + 1]:
                return None
            sock, i = argv[i + 1], i + 2
            continue
        if a.startswith("--socket=") and len(a) > len("--socket="):
            sock = a[len("--socket="):]
        elif a.startswith("-") or not a:
            return None
        elif not command:
            if a != "status":
                return None
            command = True
        else:
            names.append(a)
        i += 1
    return (sock, names) if command else None


def _ask(path: str) -> list[dict[str, object]] | int | None:
    """The status list nsinitd answers; for an error reply (a refusal...), the exit status once
    the full client's message is printed; None for anything else."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.setblocking(False)  # a full backlog: EAGAIN at once, and the full path waits its bounded while
        try:
            s.connect(path)
        except OSError:
            return None
        deadline = time.monotonic() + QUICK_TIMEOUT
        s.settimeout(QUICK_TIMEOUT)
        try:
            s.sendall(_REQUEST)
        except OSError:
            pass  # nsinitd may have refused us and closed already: its reason is waiting to be read
        data = b""
        while b"\n" not in data:
            if len(data) > MAX_ANSWER:
                return None
            s.settimeout(max(deadline - time.monotonic(), 1e-6))
            chunk = s.recv(1 << 16)
            if not chunk:
                return None
            data += chunk
    except OSError:  # timeout included: the full path asks again and reports what it gets
        return None
    finally:
        s.close()
    try:
        answer = loads(data[: data.index(b"\n")])
    except ValueError:  # JSONError, UnicodeDecodeError
        return None
    if not isinstance(answer, dict):
        return None
    if answer.get("ok") is False and answer.get("id") in (1, None):  # a refusal answers no request: id null
        return _error_reply(answer.get("error"))
    if answer.get("ok") is not True or answer.get("id") != 1:
        return None
    programs = answer.get("result")
    if not isinstance(programs, list) or not all(
            isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("state"), str)
            for p in programs):
        return None
    return programs


def _error_reply(error: object) -> int | None:
    """Say what the full client says of an error reply, and return its exit status: asking again
    through the full path would be refused (and logged by nsinitd) twice."""
    if not (isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)):
        return None
    from supervisor.ctl.errors import status_for  # the full client's modules, on this path only
    from supervisor.ctl.render import Output

    # what supervisor.ctl.run does with the daemon's error (a refusal included: status_for says 5)
    Output(sys.stdout, sys.stderr, json=False).error(error["message"])
    return status_for(error["code"])


def status(argv: list[str]) -> int | None:
    """Print the status table and return 0, or None to leave the command to the full path."""
    asked = parse(argv)
    if asked is None:
        return None
    path, names = asked
    programs = _ask(path)
    if programs is None or isinstance(programs, int):
        return programs
    if names:
        by_name = {p["name"]: p for p in programs}
        if any(by_name.get(n, {}).get("state") != "RUNNING" for n in names):
            return None  # unknown or not running: the full path names them and picks the status
        programs = [by_name[n] for n in dict.fromkeys(names)]
    text = "".join(line + "\n" for line in status_lines(programs, time.time()))
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `nsinitctl status | head`: the reader left; as the full path, not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
