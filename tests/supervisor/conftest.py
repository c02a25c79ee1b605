"""Fixtures for the supervisor tests: configs in tmp_path, an in-process nsinitd, a fake runtime,
and a check that every test leaves no child process and no cgroup directory behind."""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

from nsruntime import ContainerConfig, ExitStatus, NsRuntimeError, load_config
from supervisor import config as config_mod
from supervisor.daemon import Daemon, cgroup_root_name
from supervisor.events import validate
from supervisor.process import cgroup2_mount, children, own_cgroup2, proc_start_time
from supervisor.spawner import Spawner, Stale

# -- a fake runtime: containers whose "PID 1" is a pipe we make readable --------------------------


class FakeRuntimeError(NsRuntimeError):
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
        self.exit: ExitStatus | None = None
        self.signals: list[int] = []
        self.destroyed = False
        self.out = os.dup(stdio[1])
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "pid").write_text(str(self.pid))

    def start(self) -> None:
        os.write(self.out, f"started {' '.join(self.command)}\n".encode())
        os.close(self.out)
        if self.command[0] == "crash":
            self._die(ExitStatus(int(self.command[1]), None))
        elif self.command[0] == "oom":
            self._die(ExitStatus(137, signal.SIGKILL, oom_killed=True))

    def _die(self, st: ExitStatus) -> None:
        if self.exit is None:
            self.exit = st
            os.write(self._w, b"x")

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.command[0] != "stubborn":
            self._die(ExitStatus(128 + signum, signum))

    def kill(self) -> None:
        self._die(ExitStatus(137, signal.SIGKILL))

    @property
    def control_fd(self) -> int:
        return self._r

    def poll(self) -> ExitStatus | None:
        return self.exit

    def stats(self) -> dict[str, int]:
        return {"pids": 0 if self.exit else 1}

    def destroy(self) -> dict[str, list[str]]:
        if not self.destroyed:
            self.destroyed = True
            os.close(self._r)
            os.close(self._w)
            (self.state_dir / "pid").unlink(missing_ok=True)
            self.rt.live.discard(self)
        return {"cgroups": [f"/fake/{self.pid}"], "links": [], "files": ["pid"]}


class FakeCreation:
    """A create whose PID 1 is ready at once: fd is readable, the first step() hands it over."""

    def __init__(self, container: FakeContainer) -> None:
        self.container: FakeContainer | None = container
        self.deadline = time.monotonic() + 30
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        os.write(self._w, b"r")

    @property
    def fd(self) -> int:
        return self._r

    def step(self) -> FakeContainer | None:
        c, self.container = self.container, None
        self._close()
        return c

    def time_out(self) -> NoReturn:
        self.abort()
        raise FakeRuntimeError("create: container init did not answer within 30 s")

    def abort(self) -> None:
        if self.container is not None:
            self.container.destroy()
            self.container = None
        self._close()

    def _close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class FakeRuntime:
    """A Spawner in full (supervisor.spawner), with no kernel: configs are parsed for real."""

    def __init__(self) -> None:
        self.count = 0
        self.live: set[FakeContainer] = set()
        self.created: list[FakeContainer] = []
        self.closed = False

    def load(self, path: Path) -> ContainerConfig:
        return load_config(path)

    def find_stale(self, state_dir: Path) -> Stale | None:
        return None  # a fake container never outlives its test

    def adopt(self, state_dir: Path, control_fd: int, pid: int) -> FakeContainer | None:
        os.close(control_fd)
        return None

    def exit_report(self, control_fd: int) -> ExitStatus | None:
        os.close(control_fd)
        return None

    def release(self, state_dir: Path) -> dict[str, list[str]]:
        return {}

    def begin(self, config: ContainerConfig, rootfs: Path, command: Sequence[str], state_dir: Path, *,
              env: Mapping[str, str], stdio: tuple[int, int, int]) -> FakeCreation:
        if command[0] == "fail-create":
            raise FakeRuntimeError("create: clone(CLONE_NEWPID): EPERM (Operation not permitted)")
        c = FakeContainer(self, list(command), state_dir, stdio, dict(env))
        self.live.add(c)
        self.created.append(c)
        return FakeCreation(c)

    def close(self) -> None:
        self.closed = True


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
    """``await run_daemon(config, spawner=None)`` -> Running; shut down (and checked) at teardown.

    The in-process daemon makes the test process a child subreaper; the flag is restored after,
    so later tests' orphans still go to init instead of becoming our zombies.
    """
    was_subreaper = _subreaper()
    started: list[Running] = []

    async def start(config: config_mod.Config, spawner: Spawner | None = None, wait_ready: bool = True) -> Running:
        stream = io.StringIO()
        daemon = Daemon(config, stream=stream, use_socket=False, spawner=spawner)
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
