"""The seam between nsinitd and the container runtime: everything a program asks of it, typed.

A container program meets the runtime here and nowhere else. :class:`Spawner` is the whole
contract: read a container.json, find what a previous nsinitd left running in a state dir, begin
a container (the handshake with its PID 1 is then driven from trio's loop through
:class:`Creation`), and let go of what the spawner holds at shutdown. What comes back is a
:class:`Created` container, which ends with an ``ExitStatus``: the runtime's record, the one
nsinitd reports for plain processes too.

Two classes implement it in full: :class:`NsRuntime` below, over nsruntime's functions (and its
zygote), and the fake in the tests, which drives the same program code with no kernel at all.
Nothing else may stand in for a spawner, so nsinitd keeps no branch for a half-implemented one.

The runtime is reached through the top-level ``nsruntime`` package only; its heavy modules
(creator, zygote) load on first use, so a config of plain programs never pays for them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import nsruntime
from nsruntime import ContainerConfig, ExitStatus, NsRuntimeError

from .process import Reaper

#: What a container's teardown released, by kind: cgroups, links, files.
Released = Mapping[str, Sequence[str]]


class Created(Protocol):
    """A container whose PID 1 is up and its root in place, the command waiting for start().

    Every method is safe to call on a container that has exited already.
    """

    @property
    def pid(self) -> int:
        """PID 1's host pid."""

    @property
    def pidfd(self) -> int:
        """Readable once PID 1 has exited."""

    def start(self) -> None:
        """Let the command run."""

    def signal(self, signum: int) -> None:
        """To the command, through PID 1."""

    def kill(self) -> None:
        """SIGKILL every process of the container."""

    def poll(self) -> ExitStatus | None:
        """The exit status once PID 1 has exited (reaping it), else None; never blocks."""

    def stats(self) -> Mapping[str, int]:
        """cpu_usage_ns, memory_bytes, pids ... as far as the container's cgroups tell."""

    def destroy(self) -> Released:
        """Kill what is left, reap PID 1, release cgroups, links and records; bounded."""


class Creation(Protocol):
    """A container on its way up: wait until ``fd`` is readable, then step(), until it returns
    the container; past ``deadline`` (time.monotonic()) call time_out(). step() and time_out()
    raise having released everything; abort() does the same for a caller that gives up."""

    @property
    def fd(self) -> int: ...

    @property
    def deadline(self) -> float: ...

    def step(self) -> Created | None: ...

    def time_out(self) -> NoReturn: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class Stale:
    """The live PID 1 of a container that a previous nsinitd (killed with SIGKILL) left running in
    a program's state dir, opened as ``pidfd``: whatever is sent through it reaches that process
    or nothing, even if the pid is reused meanwhile. The caller closes pidfd."""

    pid: int
    pidfd: int


class Spawner(Protocol):
    """What nsinitd needs from a container runtime; every method is called from trio's loop and
    returns quickly (the slow part of a create is the Creation, driven by the loop)."""

    def load(self, path: Path) -> ContainerConfig:
        """The container.json at path; nsruntime.ConfigError (naming path and field) if it is
        unreadable or invalid."""

    def find_stale(self, state_dir: Path) -> Stale | None:
        """The container left running in state_dir, if any (its PID 1 checked and opened)."""

    def begin(self, config: ContainerConfig, rootfs: Path, command: Sequence[str], state_dir: Path, *,
              env: Mapping[str, str], stdio: tuple[int, int, int]) -> Creation:
        """Begin making the container; its PID 1 outlives nsinitd (nsinitd reclaims it when it
        comes back). A held state dir lock is refused at once, never waited for. Raises
        NsRuntimeError (or OSError), having left nothing behind."""

    def close(self) -> None:
        """Let go of what the spawner holds (the zygote); called once, at shutdown."""


class NsRuntime:
    """The real :class:`Spawner`: nsruntime's create, driven from the loop, and its zygote.

    Forked from the zygote, a container's PID 1 keeps sharing that small, idle process's pages
    instead of owning a copy of nsinitd's: about 3 MiB of PSS per container, not 7. The zygote is
    nsinitd's child, so the reaper is told it is owned: the stranger reaper must leave it alone.
    """

    def __init__(self, reaper: Reaper, zygote: nsruntime.Zygote | None = None) -> None:
        self.reaper = reaper
        #: launched early by supervisor.nsinitd, or started here on the first container
        self.zygote = zygote
        if zygote is not None:
            reaper.own(zygote.pid)

    def load(self, path: Path) -> ContainerConfig:
        return nsruntime.load_config(path)

    def find_stale(self, state_dir: Path) -> Stale | None:
        # describe() reports a pid only if the pid file's start time still matches, so a reused
        # pid is never taken; the pidfd is opened and the pid checked again, which closes the
        # window in between.
        if not (state_dir / "pid").exists():
            return None
        desc = nsruntime.describe(state_dir)
        pid = desc.get("pid") if desc.get("status") == "running" else None
        if not isinstance(pid, int) or not pid:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        if nsruntime.describe(state_dir).get("pid") != pid:
            os.close(pidfd)
            return None
        return Stale(pid, pidfd)

    def begin(self, config: ContainerConfig, rootfs: Path, command: Sequence[str], state_dir: Path, *,
              env: Mapping[str, str], stdio: tuple[int, int, int]) -> Creation:
        # the zygote's container process parses container.json from its request; a config read
        # from an OCI bundle (recorded in nsrun's shape: never container.json's keys) forks from here
        oci = isinstance(config.source, dict) and "nsrun" in config.source
        return nsruntime.begin_create(config, rootfs, command, state_dir, env=dict(env), stdio=stdio,
                                      die_with_parent=False, zygote=None if oci else self._live_zygote(),
                                      wait_lock=False)

    def _live_zygote(self) -> nsruntime.Zygote | None:
        """A live zygote, started on first use; None if it can't start (PID 1 is then forked from
        nsinitd itself: more memory, same container)."""
        if self.zygote is not None and self.zygote.alive():
            try:
                self.zygote.wait_ready()  # launched early (supervisor.nsinitd): booted meanwhile
                return self.zygote
            except (OSError, NsRuntimeError):
                pass  # gone: start another
        self.close()
        try:
            self.zygote = nsruntime.Zygote.start()
        except (OSError, NsRuntimeError) as e:
            print(f"nsinitd: warning: no zygote, containers fork from nsinitd itself: {e}", file=sys.stderr)
            return None
        self.reaper.own(self.zygote.pid)
        return self.zygote

    def close(self) -> None:
        if self.zygote is not None:
            self.zygote.close()
            self.reaper.disown(self.zygote.pid)
            self.zygote = None
