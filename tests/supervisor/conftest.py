"""Fixtures for the supervisor tests: configs in tmp_path, an in-process nsinitd, a fake runtime,
and a check that every test leaves no child process and no cgroup directory behind."""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from supervisor import config as config_mod
from supervisor.daemon import Daemon, cgroup_root_name
from supervisor.events import validate
from supervisor.process import cgroup2_mount, children, own_cgroup2, proc_start_time

# -- a fake nsruntime: containers whose "PID 1" is a pipe we make readable ------------------------


@dataclass(frozen=True)
class FakeExitStatus:
    exit_code: int
    signal: int | None
    oom_killed: bool


class FakeRuntimeError(Exception):
    pass


class FakeContainer:
    """Behaviour from the command: ``crash CODE`` exits at start; ``run`` runs until signalled;
    ``stubborn`` ignores every signal but SIGKILL (kill()); ``oom`` dies OOM-killed at start."""

    def __init__(self, rt: FakeRuntime, command: list[str], state_dir: Path, stdio: tuple[int, int, int],
                 env: dict[str, str]) -> None:
        rt.count += 1
        self.rt = rt
        self.pid = 10_000_000 + rt.count  # above pid_max: never a real process
        self.command = command
        self.env = env
        self.state_dir = state_dir
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self.pidfd = self._r
        self.exit: FakeExitStatus | None = None
        self.signals: list[int] = []
        self.destroyed = False
        self.out = os.dup(stdio[1])
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "pid").write_text(str(self.pid))

    def start(self) -> None:
        os.write(self.out, f"started {' '.join(self.command)}\n".encode())
        os.close(self.out)
        if self.command[0] == "crash":
            self._die(FakeExitStatus(int(self.command[1]), None, False))
        elif self.command[0] == "oom":
            self._die(FakeExitStatus(137, signal.SIGKILL, True))

    def _die(self, st: FakeExitStatus) -> None:
        if self.exit is None:
            self.exit = st
            os.write(self._w, b"x")

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.command[0] != "stubborn":
            self._die(FakeExitStatus(128 + signum, signum, False))

    def kill(self) -> None:
        self._die(FakeExitStatus(137, signal.SIGKILL, False))

    def poll(self) -> FakeExitStatus | None:
        return self.exit

    def destroy(self) -> dict[str, list[str]]:
        if not self.destroyed:
            self.destroyed = True
            os.close(self._r)
            os.close(self._w)
            (self.state_dir / "pid").unlink(missing_ok=True)
            self.rt.live.discard(self)
        return {"cgroups": [f"/fake/{self.pid}"], "links": [], "files": ["pid"]}


class FakeRuntime:
    NsRuntimeError = FakeRuntimeError
    ConfigError = FakeRuntimeError
    ExitStatus = FakeExitStatus

    def __init__(self) -> None:
        self.count = 0
        self.live: set[FakeContainer] = set()
        self.created: list[FakeContainer] = []

    def load_config(self, path: Path) -> Any:
        data = json.loads(Path(path).read_text())
        if data.get("broken"):
            raise FakeRuntimeError(f"{path}: broken: true")
        return data

    def create(self, cfg: Any, rootfs_dir: Path, command: list[str], state_dir: Path, *, env: dict[str, str],
               stdio: tuple[int, int, int], die_with_parent: bool) -> FakeContainer:
        if command[0] == "fail-create":
            raise FakeRuntimeError("create: clone(CLONE_NEWPID): EPERM (Operation not permitted)")
        c = FakeContainer(self, command, state_dir, stdio, env)
        self.live.add(c)
        self.created.append(c)
        return c


@pytest.fixture
def fake_runtime() -> Iterator[FakeRuntime]:
    rt = FakeRuntime()
    yield rt
    assert not rt.live, "fake containers left undestroyed"


# -- configs --------------------------------------------------------------------------------------


class ConfigWriter:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "supervisor.toml"
        (root / "box").mkdir(exist_ok=True)
        (root / "box" / "container.json").write_text("{}")

    def write(self, programs: str, supervisor: str = "") -> Path:
        head = textwrap.dedent(f"""
            [supervisor]
            socket = "nsinitd.sock"
            log_dir = "logs"
            state_dir = "state"
            event_log = "events.jsonl"
            {textwrap.dedent(supervisor).strip()}
        """)
        self.path.write_text(head + "\n" + textwrap.dedent(programs))
        return self.path

    def load(self, programs: str, supervisor: str = "") -> config_mod.Config:
        return config_mod.load(self.write(programs, supervisor))


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigWriter:
    return ConfigWriter(tmp_path)


# -- an in-process daemon, watched through its events --------------------------------------------


class Watcher:
    """Every event the daemon emits, each validated against the schema as it arrives."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._new = trio.Event()

    def feed(self, obj: dict[str, Any]) -> None:
        validate(obj)
        self.events.append(obj)
        self._new.set()
        self._new = trio.Event()

    def names(self, program: str | None = None) -> list[str]:
        return [e["event"] for e in self.events if program is None or e.get("program") == program]

    def find(self, event: str, program: str | None = None, start: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[start:] if e["event"] == event
                and (program is None or e.get("program") == program)]

    async def wait(self, event: str, program: str | None = None, count: int = 1, timeout: float = 10.0,
                   start: int = 0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                found = self.find(event, program, start)
                if len(found) >= count:
                    return found[count - 1]
                await self._new.wait()


class Running:
    def __init__(self, daemon: Daemon, watcher: Watcher, stream: io.StringIO) -> None:
        self.daemon = daemon
        self.watcher = watcher
        self.stream = stream

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


def _subreaper(value: int | None = None) -> int:
    """Get (or set) this process's PR_SET_CHILD_SUBREAPER flag."""
    libc = ctypes.CDLL(None, use_errno=True)
    if value is not None:
        libc.prctl(36, ctypes.c_ulong(value), 0, 0, 0)
        return value
    flag = ctypes.c_int(0)
    libc.prctl(37, ctypes.byref(flag), 0, 0, 0)
    return flag.value


@pytest.fixture
async def run_daemon(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """``await run_daemon(config, runtime=None)`` -> Running; shut down (and checked) at teardown.

    The in-process daemon makes the test process a child subreaper; the flag is restored after,
    so later tests' orphans still go to init instead of becoming our zombies.
    """
    was_subreaper = _subreaper()
    started: list[Running] = []

    async def start(config: config_mod.Config, runtime: Any = None, wait_ready: bool = True) -> Running:
        stream = io.StringIO()
        daemon = Daemon(config, stream=stream, use_socket=False, runtime=runtime)
        watcher = Watcher()
        daemon.bus.taps.append(watcher.feed)
        done = trio.Event()

        async def main() -> None:
            try:
                await daemon.run()
            finally:
                done.set()

        daemon.done = done  # type: ignore[attr-defined]
        nursery.start_soon(main)
        r = Running(daemon, watcher, stream)
        started.append(r)
        if wait_ready:
            with trio.fail_after(15):
                await daemon.ready.wait()
        return r

    yield start
    for r in started:
        r.daemon.request_shutdown("test over")
        with trio.fail_after(20):
            await r.daemon.done.wait()  # type: ignore[attr-defined]
        lines = r.lines()
        assert lines[-1]["event"] == "supervisor.stopped"
        for obj in lines:
            validate(obj)
    _subreaper(was_subreaper)


# -- nothing left behind --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """No child (running or zombie) and no cgroup directory may outlive a test."""
    before = children()
    yield
    deadline = time.monotonic() + 3
    left = children() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = children() - before
    for pid in left:  # clean up for the next test, then fail this one
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not left, f"child processes left behind (running or zombie): {sorted(left)}"
    mount = cgroup2_mount()
    if mount is not None:
        mine = own_cgroup2(mount) / cgroup_root_name(os.getpid(), proc_start_time(os.getpid()) or 0)
        assert not mine.exists(), f"cgroup left behind: {mine}"
