"""A real nsinitd as a subprocess (``python -m supervisor.nsinitd``, the entry point itself: no PATH
needed), driven through its real control socket and watched through its stdout (one JSON event per line).

Everything here is synchronous on purpose: the latencies measured are what a client sees, not what
a trio task in the test process sees.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.events import validate
from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CTL = [sys.executable, "-m", "supervisor.ctl"]


def proc_start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[19])


def alive(pid: int) -> bool:
    """Running, i.e. neither gone nor a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


class Daemon:
    """One nsinitd subprocess; ``events()`` are its stdout lines, each checked against the schema."""

    def __init__(self, run: Path, conf: Path, umask: int | None) -> None:
        self.run = run
        self.conf = conf
        self.socket = run / "ctl" / "nsinitd.sock"
        self.out_path = run / "nsinitd.out"
        self.err_path = run / "nsinitd.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        kw: dict[str, Any] = {} if umask is None else {"umask": umask}
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.nsinitd", "-c", str(conf)],
                                     stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                     cwd=REPO, env=ENV, **kw)
        self._events: list[dict[str, Any]] = []
        self._offset = 0

    def events(self) -> list[dict[str, Any]]:
        with open(self.out_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            obj = json.loads(line)
            validate(obj)
            self._events.append(obj)
        self._offset += end
        return self._events

    def find(self, event: str, program: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == event and (program is None or e.get("program") == program)]

    def wait_for(self, event: str, program: str | None = None, count: int = 1, timeout: float = 15) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            found = self.find(event, program)
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"nsinitd exited {self.proc.returncode} before {event} {program}: "
                                     f"{self.err_path.read_text()[-2000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"no {event} for {program} within {timeout} s; last events: "
                                     f"{self.events()[-5:]}")
            time.sleep(0.02)

    def call(self, cmd: str, timeout: float = 10, **args: Any) -> tuple[Any, float]:
        """One request on a fresh connection, as nsinitctl makes it; (reply, seconds it took)."""
        t0 = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(json.dumps({"id": 1, "cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise EOFError(f"nsinitd closed the connection: {buf[-200:]!r}")
                buf += chunk
        took = time.perf_counter() - t0
        reply = json.loads(buf)
        assert reply.get("ok"), reply
        return reply["result"], took

    def wait_answering(self, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                self.call("version", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise AssertionError(f"nsinitd not answering (exit {self.proc.poll()}): "
                                         f"{self.err_path.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def states(self) -> dict[str, dict[str, Any]]:
        result, _ = self.call("status")
        return {s["name"]: s for s in result}

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


@pytest.fixture
def nsinitd(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``nsinitd(programs_toml, umask=None, supervisor="")`` -> a started :class:`Daemon`.

    Paths under ``tmp_path/run`` (nested, not made beforehand: nsinitd makes them). A daemon the
    test left running is stopped in order (SIGTERM, bounded), then killed.
    """
    started: list[Daemon] = []

    def start(programs: str, umask: int | None = None, supervisor: str = "") -> Daemon:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        conf = run / "nsinitd.toml"
        extra = textwrap.dedent(supervisor).strip()
        if "event_log" not in extra:
            extra = f'event_log = "{run}/log/events/events.jsonl"\n{extra}'
        conf.write_text(textwrap.dedent(f"""
            [supervisor]
            socket = "{run}/ctl/nsinitd.sock"
            state_dir = "{run}/state/nsinitd"
            log_dir = "{run}/log/nsinitd"
        """) + extra + "\n" + textwrap.dedent(programs))
        d = Daemon(run, conf, umask)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(90)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait(10)
        d.close()


class LineReader:
    """A subprocess's stdout read by a thread: (monotonic time, line) as each line arrives."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=REPO)
        self.lines: list[tuple[float, str]] = []
        self.result: tuple[int, str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode()))

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        """Wait for the exit (killed after timeout); (status, stderr)."""
        if self.result is not None:
            return self.result
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._thread.join(5)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        self.result = (rc, err)
        return self.result


@pytest.fixture
def line_reader() -> Iterator[Callable[[list[str]], LineReader]]:
    started: list[LineReader] = []

    def start(argv: list[str]) -> LineReader:
        r = LineReader(argv)
        started.append(r)
        return r

    yield start
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
        r.finish()


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is nobody's container: the test's own `sleep`."""
    p = subprocess.Popen(["sleep", "1000"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()
