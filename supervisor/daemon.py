"""``nsinitd``: the supervisor daemon, in the foreground, on one trio event loop.

    nsinitd -c FILE [--no-socket] [--check] [--log-format text|json]

Signals: TERM and INT stop every program in descending priority (stopsignal, SIGKILL after
stopwaitsecs, containers torn down) and exit 0; HUP rereads the config and applies additions,
removals and changes (a changed program is restarted); USR2 reopens the event log and the
captured-output files. nsinitd is a child subreaper (container PID 1s and orphaned grandchildren
are reparented to it) and reaps every child no program owns, which is also what it does as PID 1.

Under systemd (``NOTIFY_SOCKET`` set) it sends READY=1 once the autostart programs have left
STARTING, and STOPPING=1 when the shutdown begins.

One nsinitd per state_dir: it holds a lock on ``<state_dir>/.nsinitd.lock`` for as long as it
lives; a second one on the same state_dir (``--no-socket``, or a copy of the config with another
socket) exits 1 before it creates, reclaims or starts anything.

Exit status:
    0  ordered shutdown (signal or ``nsinitctl shutdown``)
    1  could not run: state_dir held by another nsinitd, state/log directory, control socket in
       use, internal error
    2  bad command line or bad config (nothing was started); the message names table and key
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import trio

from nsruntime import ExitStatus, proc_state

from . import __version__, machine
from . import config as config_mod
from . import keeper as keeper_proto
from .api import ControlError, ProgramStatus
from .config import Config, ConfigError
from .events import EventBus, Subscription
from .kept import GoneChild, KeeperClient, KeeperError, KeptChild, config_digest
from .options import Options, parse_args
from .process import Cgroup, Child, Reaper, Released, cgroup2_mount, own_cgroup2, proc_start_time, set_child_subreaper
from .program import ContainerChild, Context, Program
from .spawner import NsRuntime, Spawner
from .states import SIGNALLABLE_STATES, ProcessState

if TYPE_CHECKING:
    from nsruntime import Zygote

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def sd_notify(message: str) -> None:
    """Send a message to systemd's notify socket, if there is one; never fails."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


#: In the state_dir; program names can't start with a dot, so no program's directory is named so.
LOCK_NAME = ".nsinitd.lock"


class StateDirBusy(Exception):
    """Another live nsinitd holds the state_dir; ``str()`` is the one line nsinitd prints."""

    def __init__(self, state_dir: Path, holder: int | None) -> None:
        who = f" (pid {holder})" if holder else ""
        super().__init__(f"state_dir {state_dir} is in use by a live nsinitd{who}: one nsinitd per state_dir")
        self.holder = holder


# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhqqi4x"


def hold_state_dir(state_dir: Path) -> int:
    """Take the state_dir for this process; return the descriptor that holds it (keep it open).

    A classic POSIX record lock (F_SETLK), not flock or an OFD lock: it belongs to this process
    and is not inherited by fork, so the zygote, plain programs and container PID 1s, which
    outlive a SIGKILLed nsinitd, never keep the state_dir held after nsinitd is gone. Beware:
    closing *any* descriptor of the lock file in this process drops the lock, so nothing else
    opens it. Raises StateDirBusy naming the holder's pid (F_GETLK), or OSError.
    """
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        for _ in range(10):  # the holder may exit between our attempt and the question who it is
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
                l_type, _, _, _, holder = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
                if l_type != fcntl.F_UNLCK:
                    raise StateDirBusy(state_dir, holder) from None
                continue
            os.ftruncate(fd, 0)  # for the curious: who holds it (the lock, not this text, is the truth)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        raise StateDirBusy(state_dir, None)
    except BaseException:
        os.close(fd)
        raise


#: In the state_dir: which layout of it this nsinitd writes and reads (the keeper's protocol).
LAYOUT_NAME = "layout"
LAYOUT = f"nsinitd-state {keeper_proto.PROTOCOL}"


class StateDirLayout(Exception):
    """The state_dir was written by another nsinitd version; ``str()`` is the one line printed."""


def check_layout(state_dir: Path) -> None:
    """Refuse a state_dir another nsinitd version wrote (its records would be misread); mark a new
    one as ours. A state_dir without the mark is an older nsinitd's: taken only when none of the
    processes its records name still runs (pid and start time), else refused."""
    mark = state_dir / LAYOUT_NAME
    try:
        found = mark.read_text().strip()
    except FileNotFoundError:
        found = None
    if found is not None and found != LAYOUT:
        raise StateDirLayout(f"state_dir {state_dir} was written by another nsinitd version (layout {found!r}, "
                             f"this one reads {LAYOUT!r}): stop its programs with that version, or use "
                             f"another state_dir")
    if found is None:
        for pid_file in state_dir.glob("*/pid"):
            try:
                pid = int(pid_file.read_text())
                start = int((pid_file.parent / "start").read_text())
            except (OSError, ValueError):
                continue
            if proc_start_time(pid) == start:
                raise StateDirLayout(f"state_dir {state_dir} was written by an older nsinitd whose program "
                                     f"{pid_file.parent.name} (pid {pid}) still runs: stop it with that "
                                     f"version, or use another state_dir")
        tmp = state_dir / f".{LAYOUT_NAME}.tmp"
        tmp.write_text(LAYOUT + "\n")
        os.replace(tmp, mark)


def cgroup_root_name(pid: int, ticks: int) -> str:
    """The cgroup2 directory of the nsinitd with this pid and start time (clock ticks since boot):
    the pair names one process for the life of the machine, whatever pid reuse happens."""
    return f"nsinitd-{pid}-{ticks}"


def _owner_alive(name: str) -> bool:
    """Does the nsinitd (or keeper) that made the directory ``name`` (``nsinitd-<pid>-<ticks>``,
    ``nsinit-keeper-<pid>-<ticks>``) still live? A process that merely reuses its pid has other
    start ticks. A name without them (made by an older nsinitd) counts as alive while its pid
    exists: only a kept directory is at stake."""
    pid_text, _, ticks_text = name.removeprefix("nsinit-keeper-").removeprefix("nsinitd-").partition("-")
    if not pid_text.isdigit() or not (ticks_text.isdigit() or ticks_text == ""):
        return True  # not one of ours: leave it alone
    if not ticks_text:
        return os.path.exists(f"/proc/{pid_text}")
    # a zombie is dead, though its start time still reads: this host's init may reap it late
    return proc_start_time(int(pid_text)) == int(ticks_text) and proc_state(int(pid_text)).split()[0] != "Z"


async def _clean_stale_cgroups(parent: Path, reaper: Reaper) -> None:
    """Kill and remove what a crashed nsinitd left under ``parent/nsinitd-<pid>-<ticks>`` (its
    plain programs and their children), so a restarted nsinitd runs exactly one instance of each."""
    try:
        dirs = [*parent.glob("nsinitd-*"), *parent.glob("nsinit-keeper-*")]
    except OSError:
        return
    for d in dirs:
        if _owner_alive(d.name):
            continue
        try:
            subs = [p for p in d.iterdir() if p.is_dir()]
        except OSError:
            continue
        for sub in [*subs, d]:
            try:
                await Cgroup(sub).remove(reaper, timeout=5.0)
            except OSError as e:
                print(f"nsinitd: warning: stale cgroup: {e}", file=sys.stderr)


def _ignore(prog: Program) -> None:
    pass


def _left_starting(state: ProcessState) -> bool:
    return state is not ProcessState.STARTING


class Daemon:
    """The supervisor; implements :class:`supervisor.api.SupervisorAPI` for the control server."""

    def __init__(self, config: Config, *, stream: TextIO | None = None, use_socket: bool = True,
                 spawner: Spawner | None = None, subreaper: bool = True, zygote: Zygote | None = None,
                 log_format: str = "json", keeper: bool = False) -> None:
        """spawner: how containers are made, nsruntime's (NsRuntime) unless given; zygote: one
        launched early, for NsRuntime to use (not with keeper: the keeper starts it); keeper: the
        programs' parent is the state_dir's keeper, so they outlive this nsinitd and the next
        one adopts them (the real nsinitd), else nsinitd itself (in-process tests)."""
        self.config = config
        self.stream = stream if stream is not None else sys.stdout
        self.use_socket = use_socket
        self.subreaper = subreaper
        sup = config.supervisor
        self.bus = EventBus(self.stream, sup.event_log, stream_format=log_format)
        self.reaper = Reaper()
        self.use_keeper = keeper
        self.keeper: KeeperClient | None = None
        self._nsruntime: NsRuntime | None = None
        if spawner is None:
            spawner = self._nsruntime = NsRuntime(self.reaper, zygote)
        self.ctx = Context(self.bus, self.reaper, sup.log_dir, sup.state_dir, spawner)
        self.programs: dict[str, Program] = {}
        self._programs_nursery: trio.Nursery | None = None
        self._root: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self._shutdown_reason = ""
        self._keep_running = False
        self._startup_scope = trio.CancelScope()
        self._lock = trio.Lock()
        self.ready = trio.Event()
        self.exit_code = EXIT_OK
        self._state_lock = -1

    # -- the main task ----------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            if self._state_lock >= 0:  # last: the state_dir is ours until everything is released
                os.close(self._state_lock)
                self._state_lock = -1

    def _take_state_dir(self) -> bool:
        """Make and hold the state_dir, before anything else is made, reclaimed or started."""
        state_dir = self.config.supervisor.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._state_lock = hold_state_dir(state_dir)
        except StateDirBusy as e:
            print(f"nsinitd: {e}", file=sys.stderr)
            return False
        except OSError as e:
            print(f"nsinitd: state_dir {state_dir}: {e.strerror or e}", file=sys.stderr)
            return False
        return True

    async def _run(self) -> int:
        sup = self.config.supervisor
        if not self._take_state_dir():
            return EXIT_FAILED  # nothing happened: no event, not even supervisor.stopped
        try:
            sup.log_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as e:
            print(f"nsinitd: cannot create {e.filename}: {e.strerror}", file=sys.stderr)
            return EXIT_FAILED
        if self.subreaper:
            try:
                set_child_subreaper()
            except OSError as e:
                print(f"nsinitd: warning: {e}", file=sys.stderr)
        if self.use_keeper:
            if not await self._attach_keeper():
                return EXIT_FAILED
        else:
            self.ctx.cgroup_root = await self._make_cgroup_root()
        self.reaper.on_reaped = self._stranger_reaped
        self.reaper.pressure = lambda: self.bus.busiest() > 0.5
        try:
            async with trio.open_nursery() as root:
                self._root = root
                await root.start(self._signals)
                if self.keeper is not None:
                    await root.start(self.keeper.run)
                    await self._keeper_zygote()
                root.start_soon(self.reaper.run)
                root.start_soon(self._tick)
                if self.use_socket and not await self._start_server(root):
                    self.exit_code = EXIT_FAILED
                    root.cancel_scope.cancel()
                    return self.exit_code
                if self.config.web is not None and not await self._start_web(root, self.config.web):
                    self.exit_code = EXIT_FAILED
                    root.cancel_scope.cancel()
                    return self.exit_code
                self.bus.emit("supervisor.started", pid=os.getpid(), config=str(self.config.path),
                              version=__version__)
                async with trio.open_nursery() as programs:
                    self._programs_nursery = programs
                    for pcfg in self.config.by_priority():
                        await self._add(pcfg)
                    with self._startup_scope:
                        adopted = await self._adopt_all() if self.keeper is not None else set()
                        await self._start_group([p for p in self.config.by_priority()
                                                 if p.autostart and p.name not in adopted])
                        sd_notify("READY=1")
                        self.ready.set()
                    await self._shutdown.wait()
                    if self._keep_running and self.keeper is not None:
                        self._leave_running()
                    else:
                        await self._stop_all()
                    programs.cancel_scope.cancel()
                if self.keeper is not None:  # while its reader still runs: the answer, then its exit
                    self.ctx.spawner.close()  # the zygote first: the keeper's child, it ends with its socket
                    if self.ctx.keep_running:
                        await self.keeper.detach()  # it drains the pipes from now on
                    else:
                        await self.keeper.quit(self.reaper)  # it exits with its last child
                root.cancel_scope.cancel()
        except BaseException:
            self.exit_code = EXIT_FAILED
            raise
        finally:
            self.ctx.spawner.close()
            if self.keeper is not None:
                self.keeper.close()  # (after an error: the keeper keeps what runs, for the next nsinitd)
            else:
                self._remove_cgroup_root()
            self.bus.emit("supervisor.stopped", exit_code=self.exit_code)
            self.bus.close()
        return self.exit_code

    async def _start_server(self, nursery: trio.Nursery) -> bool:
        from .server import serve  # only when the socket is wanted (--no-socket runs without it)

        try:
            await nursery.start(serve, self, self.config.supervisor.socket)
        except OSError as e:
            print(f"nsinitd: control socket {self.config.supervisor.socket}: {e}", file=sys.stderr)
            return False
        return True

    async def _start_web(self, nursery: trio.Nursery, web: config_mod.WebConfig) -> bool:
        from .web import WebError, serve  # hypercorn, starlette, prometheus_client: only with [web]

        try:
            await nursery.start(serve, self, web)
        except (OSError, WebError) as e:
            print(f"nsinitd: web.listen {web.listen}: {e}", file=sys.stderr)
            return False
        return True

    async def _make_cgroup_root(self) -> Path | None:
        mount = cgroup2_mount()
        if mount is None:
            return None
        try:
            parent = own_cgroup2(mount)
            await _clean_stale_cgroups(parent, self.reaper)
            ticks = proc_start_time(os.getpid())
            assert ticks is not None  # our own /proc entry
            root = parent / cgroup_root_name(os.getpid(), ticks)
            root.mkdir(exist_ok=True)
            return root
        except OSError as e:
            print(f"nsinitd: warning: no cgroup tracking ({e}); grandchildren may escape",
                  file=sys.stderr)
            return None

    async def _attach_keeper(self) -> bool:
        """Find the state_dir's keeper (programs a previous nsinitd left) or start one; refuse a
        state_dir or keeper of another version. Plain programs' cgroups go under the keeper's."""
        state_dir = self.config.supervisor.state_dir
        mount = cgroup2_mount()
        parent = own_cgroup2(mount) if mount is not None else None
        try:
            check_layout(state_dir)
            self.keeper = KeeperClient.attach(state_dir, parent, self.reaper)
        except (StateDirLayout, KeeperError) as e:
            print(f"nsinitd: {e}", file=sys.stderr)
            return False
        except OSError as e:
            print(f"nsinitd: state_dir {state_dir}: {e.strerror or e}", file=sys.stderr)
            return False
        self.ctx.keeper = self.keeper
        self.ctx.cgroup_root = self.keeper.cgroup
        if parent is not None:
            await _clean_stale_cgroups(parent, self.reaper)  # a dead keeper's or old nsinitd's
        return True

    async def _keeper_zygote(self) -> None:
        """Container PID 1s must be the keeper's children: their zygote is the keeper's child
        (PID 1 is cloned with CLONE_PARENT). Without one, PID 1s fork from nsinitd and die with it."""
        if self._nsruntime is None or self.keeper is None or self._nsruntime.zygote is not None:
            return
        if not any(p.container is not None for p in self.config.programs.values()):
            return  # (a reload that adds the first container program asks then)
        from nsruntime import Zygote

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            reply, _ = await self.keeper.call({"op": "zygote"}, [theirs.fileno()])
        except KeeperError as e:
            reply = {"ok": False, "error": str(e)}
        finally:
            theirs.close()
        if not reply.get("ok"):
            mine.close()
            print(f"nsinitd: warning: no zygote from the keeper ({reply.get('error')}): containers will not "
                  f"outlive nsinitd", file=sys.stderr)
            return
        self._nsruntime.close()
        self._nsruntime.zygote = Zygote(int(reply["pid"]), mine, ready=False)

    async def _adopt_all(self) -> set[str]:
        """Take back what the keeper kept: each program proven ours and unchanged is adopted as it
        runs (or its exit while we were away is seen now); removed and changed ones are adopted
        only to be stopped (a changed one then starts anew). What fails the proof is left alone,
        never signalled. Returns the names adopted."""
        keeper = self.keeper
        assert keeper is not None and self._programs_nursery is not None
        reply, _ = await keeper.call({"op": "list"})
        adopted: set[str] = set()
        for rec in reply.get("programs", []):
            name = str(rec["name"])
            taken, fds = await keeper.call({"op": "take", "name": name})
            named = dict(zip(taken.get("fds", []), fds, strict=False))
            why = "not proven ours (start time, cgroup or container records differ)"
            try:
                child = self._proven(name, rec, named)
            except Exception as e:  # a record that can't be read can't be proven: left alone
                why, child = f"{type(e).__name__}: {e}", None
            out, err = named.pop("out", -1), named.pop("err", -1)
            for fd in named.values():
                os.close(fd)
            if child is None:
                for fd in (out, err):
                    if fd >= 0:
                        os.close(fd)
                self.bus.emit("program.not_adopted", name, pid=int(rec["pid"]), reason=why)
                continue
            pcfg = self.config.programs.get(name)
            same = pcfg is not None and config_digest(pcfg) == rec.get("digest")
            if same:
                prog = self.programs[name]
            else:  # removed or changed: a program of its own, just long enough to stop it
                prog = Program(pcfg or config_mod.ProgramConfig(name, ("(removed)",)), self.ctx)
                await self._programs_nursery.start(prog.run)
            startsecs = pcfg.startsecs if pcfg is not None else 0.0
            started = min(time.time(), float(rec.get("spawned_at") or time.time()) + startsecs)
            await prog.adopt(child, started, out, err)
            if same:
                adopted.add(name)
            else:
                with trio.move_on_after(self._stop_bound(prog)):
                    await prog.finish()
        return adopted

    def _proven(self, name: str, rec: dict[str, object], fds: dict[str, int]) -> Child | None:
        """The kept process of record rec as a Child, if it is what was started for ``name``:
        a plain one has the recorded start time and sits in the program's cgroup; a container's
        PID 1 has its state records' start time, namespaces and cgroup (StateDir.open_live).
        Takes the pidfd and control socket out of fds."""
        keeper = self.keeper
        assert keeper is not None
        pid, status = int(str(rec["pid"])), rec.get("status")
        pidfd, ctl = fds.pop("pidfd", -1), fds.pop("ctl", -1)
        state_dir = self.ctx.state_dir / name
        if rec.get("kind") == "container":
            if pidfd >= 0:
                os.close(pidfd)  # the runtime opens its own after its own checks
            if status is not None:  # exited while we were away: the command's status, as PID 1 told it
                told = self.ctx.spawner.exit_report(ctl) if ctl >= 0 else None

                async def release_container() -> Released:
                    return self.ctx.spawner.release(state_dir)

                return GoneChild(pid, told or ExitStatus.from_wait_status(int(str(status))), release_container,
                                 container=True)
            c = self.ctx.spawner.adopt(state_dir, ctl, pid) if ctl >= 0 else None
            return ContainerChild(c, self.reaper) if c is not None else None
        if ctl >= 0:
            os.close(ctl)
        cgroup = Cgroup(self.ctx.cgroup_root / name) if self.ctx.cgroup_root is not None else None
        if status is not None:
            if pidfd >= 0:
                os.close(pidfd)

            async def release_plain() -> Released:
                return {"cgroups": await cgroup.remove(None) if cgroup is not None else []}

            return GoneChild(pid, ExitStatus.from_wait_status(int(str(status))), release_plain, container=False)
        if pidfd < 0 or proc_start_time(pid) != rec.get("start") or (cgroup is not None and pid not in cgroup.procs()):
            if pidfd >= 0:
                os.close(pidfd)
            return None
        return KeptChild(keeper, pid, pidfd, cgroup)

    def _leave_running(self) -> None:
        """shutdown --keep-running (or on_exit = "keep"): leave every program as it is; the
        program tasks end without touching their processes and the keeper drains their output."""
        sd_notify("STOPPING=1")
        self.bus.emit("supervisor.stopping", reason=self._shutdown_reason or "requested")
        self.ctx.keep_running = True

    def _remove_cgroup_root(self) -> None:
        root = self.ctx.cgroup_root
        if root is None:
            return
        for sub in [p for p in root.iterdir() if p.is_dir()] if root.exists() else []:
            Cgroup(sub).kill()
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass

    def _stranger_reaped(self, pid: int, info: ExitStatus) -> None:
        self.bus.emit("stranger.reaped", pid=pid, exit_code=info.exit_code)

    async def _signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
        with trio.open_signal_receiver(*sigs) as receiver:
            task_status.started()
            async for signum in receiver:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    keep = self.config.supervisor.on_exit == "keep"
                    self.request_shutdown(signal.Signals(signum).name + (" (on_exit = keep)" if keep else ""),
                                          keep_running=keep)
                elif signum == signal.SIGHUP and self._root is not None:
                    # in its own task: a TERM must not wait behind a reload's stopwaitsecs
                    self._root.start_soon(self._reload_quietly)
                elif signum == signal.SIGUSR2:
                    self.reopen_logs()

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ControlError:
            pass  # already reported as config.error

    async def _tick(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.bus.retry()

    # -- programs ---------------------------------------------------------------------------------

    async def _add(self, pcfg: config_mod.ProgramConfig) -> Program:
        assert self._programs_nursery is not None
        prog = Program(pcfg, self.ctx)
        self.programs[pcfg.name] = prog
        await self._programs_nursery.start(prog.run)
        return prog

    @staticmethod
    def _levels(progs: Sequence[Program], *, descending: bool) -> list[list[Program]]:
        """Programs in priority groups: ascending (start) or descending (stop) priority; within a
        group by name (ascending), for the order of spawns."""
        levels: dict[int, list[Program]] = {}
        for prog in sorted(progs, key=lambda p: p.name):
            levels.setdefault(prog.cfg.priority, []).append(prog)
        return [levels[prio] for prio in sorted(levels, reverse=descending)]

    async def _start_group(self, pcfgs: Sequence[config_mod.ProgramConfig]) -> None:
        """Start in ascending priority; each priority level leaves STARTING before the next."""
        await self._start_levels([self.programs[p.name] for p in pcfgs])

    async def _start_levels(self, progs: Sequence[Program], answer: Callable[[Program], None] = _ignore) -> None:
        """Start in ascending priority: a level's programs are asked in name order (each spawn then
        goes on in its own task) and awaited together; the next level only once every program of
        this one has left STARTING (RUNNING, BACKOFF, FATAL, EXITED...). answer: called for each
        program as its level is done, as start() returns for one."""
        for level in self._levels(progs, descending=False):
            waiting: set[Program] = set()
            for prog in level:
                if prog.state is ProcessState.STOPPING:
                    waiting.add(prog)  # start() waits for its stop, then starts it
                elif prog.state not in (ProcessState.STARTING, ProcessState.RUNNING):
                    await prog.command(machine.Start())
            async with trio.open_nursery() as n:
                for prog in level:
                    n.start_soon(prog.start if prog in waiting else partial(prog.wait_until, _left_starting))
            for prog in level:
                answer(prog)

    async def _stop_levels(self, progs: Sequence[Program], *, finish: bool = False, bounded: bool = True,
                           answer: Callable[[Program], None] = _ignore) -> None:
        """Stop in descending priority: every program of a level is signalled at once and the
        level is awaited together, each program for at most its own stop bound (stopwaitsecs,
        SIGKILL, teardown), before the next level is touched. A program that won't die (D state)
        is left STOPPING once its bound is over: its callers report it. finish: end the program
        tasks too (shutdown, removal on reload). Not bounded: each program's stop is awaited to
        its end (a reload must not start a program's successor beside it). answer: as for
        _start_levels."""

        async def one(prog: Program) -> None:
            with trio.move_on_after(self._stop_bound(prog) if bounded else math.inf):
                await (prog.finish() if finish else prog.stop())

        for level in self._levels(progs, descending=True):
            async with trio.open_nursery() as n:
                for prog in reversed(level):
                    n.start_soon(one, prog)
            for prog in level:
                answer(prog)

    async def _stop_all(self) -> None:
        """Stop every program in descending priority and end their tasks."""
        async with self._lock:
            sd_notify("STOPPING=1")
            self.bus.emit("supervisor.stopping", reason=self._shutdown_reason or "requested")
            # bounded: a program that won't die (D state) is left to the cancellation of the
            # programs' nursery, which reports it stuck; the shutdown never hangs on it
            await self._stop_levels(list(self.programs.values()), finish=True)

    def reopen_logs(self) -> None:
        self.bus.reopen()
        for prog in self.programs.values():
            prog.logs.reopen()

    # -- SupervisorAPI ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def socket_group(self) -> int | None:
        return self.config.supervisor.socket_group

    def _get(self, name: str) -> Program:
        prog = self.programs.get(name)
        if prog is None:
            raise ControlError("no_such_program", f"no such program: {name}")
        return prog

    def _status(self, prog: Program) -> ProgramStatus:
        e = prog.last_exit
        return ProgramStatus(
            name=prog.name,
            state=prog.state.value,
            pid=prog.pid,
            since=prog.since,
            exit_code=e.exit_code if e else None,
            signal=e.signal_name if e else None,
            restarts=prog.restarts,
            container=str(prog.cfg.container) if prog.cfg.container else None,
            description=prog.describe(),
        )

    def status(self, names: Sequence[str] = ()) -> list[ProgramStatus]:
        progs = [self._get(n) for n in names] if names else [self.programs[n] for n in sorted(self.programs)]
        return [self._status(p) for p in progs]

    def _check_open(self) -> None:
        if self._shutdown.is_set():
            raise ControlError("bad_state", "nsinitd is shutting down")

    async def start(self, name: str) -> ProgramStatus:
        prog = self._get(name)
        self._check_open()
        await prog.start()
        return self._status(prog)

    def _stop_bound(self, prog: Program) -> float:
        """How long a stop may take before the caller gets the (still STOPPING) status back."""
        return prog.cfg.stopwaitsecs + 2 * self.ctx.kill_wait + 1

    async def stop(self, name: str) -> ProgramStatus:
        prog = self._get(name)
        with trio.move_on_after(self._stop_bound(prog)):  # a process in D state can't hold us
            await prog.stop()
        return self._status(prog)

    async def restart(self, name: str) -> ProgramStatus:
        prog = self._get(name)
        self._check_open()
        with trio.move_on_after(self._stop_bound(prog)):
            await prog.stop()
        if prog.state is ProcessState.STOPPING:
            raise ControlError("failed", f"{name} did not stop ({prog.describe()})")
        await prog.start()
        return self._status(prog)

    def _many(self, names: Sequence[str]) -> tuple[list[Program], dict[str, ProgramStatus | ControlError]]:
        """The programs named (each once) and the answers already known: no_such_program."""
        progs: list[Program] = []
        answers: dict[str, ProgramStatus | ControlError] = {}
        for name in dict.fromkeys(names):
            try:
                progs.append(self._get(name))
            except ControlError as e:
                answers[name] = e
        return progs, answers

    @staticmethod
    def _in_order(names: Sequence[str],
                  answers: dict[str, ProgramStatus | ControlError]) -> list[ProgramStatus | ControlError]:
        return [answers[name] for name in dict.fromkeys(names)]

    async def start_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        progs, answers = self._many(names)
        try:
            self._check_open()
        except ControlError as e:
            return [answers.get(name, e) for name in dict.fromkeys(names)]
        await self._start_levels(progs, lambda p: answers.update({p.name: self._status(p)}))
        return self._in_order(names, answers)

    async def stop_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        progs, answers = self._many(names)
        await self._stop_levels(progs, answer=lambda p: answers.update({p.name: self._status(p)}))
        return self._in_order(names, answers)

    async def restart_many(self, names: Sequence[str]) -> list[ProgramStatus | ControlError]:
        progs, answers = self._many(names)
        try:
            self._check_open()
        except ControlError as e:
            return [answers.get(name, e) for name in dict.fromkeys(names)]
        await self._stop_levels(progs)
        up = []
        for prog in progs:
            if prog.state is ProcessState.STOPPING:
                answers[prog.name] = ControlError("failed", f"{prog.name} did not stop ({prog.describe()})")
            else:
                up.append(prog)
        await self._start_levels(up, lambda p: answers.update({p.name: self._status(p)}))
        return self._in_order(names, answers)

    def signal(self, name: str, signum: int) -> None:
        prog = self._get(name)
        if prog.child is None or prog.state not in SIGNALLABLE_STATES:
            raise ControlError("bad_state", f"{name} is not running ({prog.state.value})")
        try:
            prog.signal(signum)
        except OSError as e:
            raise ControlError("failed", f"signal {signum} to {name}: {e}") from None

    def exec_target(self, name: str) -> Path:
        prog = self._get(name)
        if prog.cfg.container is None and prog.cfg.bundle is None:
            raise ControlError("not_a_container", f"{name} is a plain process, not a container")
        if prog.child is None or prog.state not in (ProcessState.STARTING, ProcessState.RUNNING):
            raise ControlError("bad_state", f"{name} is not running ({prog.state.value})")
        return prog.state_dir

    def stats(self, name: str) -> dict[str, int]:
        """cpu_usage_ns, memory_bytes, pids (and a container's other counters), where readable."""
        child = self._get(name).child
        return dict(child.stats()) if child is not None else {}

    def log_path(self, name: str, stream: str) -> Path:
        prog = self._get(name)
        if stream not in ("stdout", "stderr"):
            raise ControlError("bad_request", f"stream must be stdout or stderr, not {stream!r}")
        return prog.logs.path(stream)

    def subscribe(self, max_buffer: int) -> Subscription:
        return self.bus.subscribe(max_buffer)

    def _changes(self, new: Config) -> tuple[list[str], list[str], list[str]]:
        """Programs added, removed and changed from the running config to ``new``."""
        old = self.config.programs
        added = sorted(new.programs.keys() - old.keys())
        removed = sorted(old.keys() - new.programs.keys())
        changed = sorted(n for n in old.keys() & new.programs.keys() if old[n] != new.programs[n])
        return added, removed, changed

    def reread(self) -> dict[str, list[str]]:
        """What reload() would change, changing nothing (nsinitctl reread)."""
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as e:
            raise ControlError("failed", str(e)) from None
        added, removed, changed = self._changes(new)
        return {"added": added, "removed": removed, "changed": changed}

    @property
    def event_log(self) -> Path | None:
        return self.config.supervisor.event_log

    async def reload(self) -> dict[str, list[str]]:
        async with self._lock:
            self._check_open()
            try:
                new = config_mod.load(self.config.path)
            except ConfigError as e:
                self.bus.emit("config.error", error=str(e))
                raise ControlError("failed", str(e)) from None
            added, removed, changed = self._changes(new)
            going = [self.programs[n] for n in removed + changed]
            await self._stop_levels(going, finish=True, bounded=False)
            for prog in going:
                del self.programs[prog.name]
            self.config = Config(self.config.path, self.config.supervisor, new.programs, self.config.web)
            await self._keeper_zygote()
            fresh = [new.programs[n] for n in added + changed]
            for pcfg in sorted(fresh, key=lambda p: (p.priority, p.name)):
                await self._add(pcfg)
            self.bus.emit("config.reloaded", added=added, removed=removed, changed=changed,
                          supervisor_changed=new.supervisor != self.config.supervisor)
            for pcfg in sorted(fresh, key=lambda p: (p.priority, p.name)):
                if pcfg.autostart:
                    await self.programs[pcfg.name].command(machine.Start())
            return {"added": added, "removed": removed, "changed": changed}

    def request_shutdown(self, reason: str = "requested", *, keep_running: bool = False) -> None:
        if not self._shutdown.is_set():
            self._shutdown_reason = reason
            self._keep_running = keep_running
            self._shutdown.set()
            self._startup_scope.cancel()

    def emit(self, event: str, **fields: object) -> None:
        program = fields.pop("program", None)
        self.bus.emit(event, program if isinstance(program, str) else None, **fields)


def run_main(opts: Options) -> None:
    """nsinitd once its command line is read (supervisor.nsinitd); exits with its status."""
    try:
        cfg = config_mod.load(opts.config)
    except ConfigError as e:
        print(f"nsinitd: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if opts.check:
        print(f"nsinitd: {cfg.path}: ok, {len(cfg.programs)} programs")
        sys.exit(EXIT_OK)
    os.umask(os.umask(0) | 0o002)  # nothing nsinitd makes may be world-writable, whatever umask it got
    log_format = opts.log_format or ("text" if sys.stdout.isatty() else "json")
    daemon = Daemon(cfg, use_socket=not opts.no_socket, log_format=log_format, keeper=True)
    sys.exit(trio.run(daemon.run))


def main(argv: Sequence[str] | None = None) -> None:
    run_main(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
