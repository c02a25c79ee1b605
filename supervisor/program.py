"""One trio task per program, carrying out the decisions of :mod:`supervisor.machine`.

Everything that changes a program goes through its inbox and is handled by its own task, one
item at a time: operator commands (start/stop), timer expiries (startsecs, backoff, stopwaitsecs)
and process exits. Handling an exit awaits the teardown (reap, kill what is left in the cgroup or
destroy the container) *before* the machine sees it, so a restart never overlaps the previous
incarnation. Timers carry a token; a timer that fires after its state was left is ignored, which
closes the race between a timer and an exit arriving together.

Cancellation reaps: however the task ends (shutdown, removal on reload, a bug), its ``finally``
stops the live process in a shielded, bounded scope (stopsignal, stopwaitsecs, SIGKILL of the
whole cgroup/container, wait, teardown), as trio's ``run_process`` does.

A container program reaches the runtime only through the context's :class:`~supervisor.spawner.Spawner`;
:class:`ContainerChild` makes what it creates one more :class:`~supervisor.process.Child`.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal as _signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nsruntime import ConfigError, ExitStatus, proc_state, signal_name

from . import machine
from .config import ProgramConfig
from .events import EventBus
from .keeper import enlarge_pipe
from .kept import GoneChild, KeeperClient, KeeperError, config_digest, spawn_kept
from .logs import ProgramLogs, pump
from .process import (
    Cgroup,
    Child,
    PlainChild,
    Reaper,
    Released,
    SpawnError,
    remove_pid_files,
    spawn_plain,
    wait_exit,
    write_pid_files,
)
from .spawner import Created, Creation, Spawner
from .states import STOPPED_STATES, ProcessState, Wanted

#: Bound on the teardown of one incarnation (cgroup emptying, container destroy).
TEARDOWN_TIMEOUT = 10.0
#: Bound on waiting for a previous run's container to die (at spawn).
KILL_WAIT = 5.0


#: systemd's messages to nsinitd alone: a program must not be able to say READY=1 for it
_PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})


def inherited_env() -> dict[str, str]:
    """The environment plain programs start from: nsinitd's, minus what is nsinitd's alone."""
    return {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}


@dataclass
class Context:
    """What every program shares with the daemon."""

    bus: EventBus
    reaper: Reaper
    log_dir: Path
    state_dir: Path
    spawner: Spawner  # containers are made through it, and only through it
    cgroup_root: Path | None = None  # nsinitd-<pid>-<ticks>/ in the cgroup2 tree, or None
    base_env: dict[str, str] = field(default_factory=lambda: inherited_env())
    #: Held around every transition and around the synchronous part of each spawn (the fork, or
    #: a container's cgroups and its request to the zygote): one at a time, in turn, so a restart
    #: storm can't starve the control socket. Not held while a container's PID 1 sets itself up:
    #: many containers come up at once.
    spawn_lock: trio.Lock = field(default_factory=trio.Lock)
    #: how long a SIGKILLed program may take to disappear before it is reported stuck
    kill_wait: float = 5.0
    #: the parent of every program, outliving nsinitd (supervisor.keeper); None: nsinitd is
    #: the programs' parent itself and they end with it (the in-process daemon of the tests)
    keeper: KeeperClient | None = None
    #: set when nsinitd leaves with its programs running (shutdown --keep-running): a program
    #: task that ends then lets its process be, for the next nsinitd to adopt
    keep_running: bool = False


class ContainerConfigError(Exception):
    """The container's container.json is unreadable or invalid: FATAL at once, not retried."""


class ContainerChild:
    """A created container as a :class:`supervisor.process.Child`."""

    def __init__(self, container: Created, reaper: Reaper) -> None:
        self.c = container
        self.pid = container.pid
        self.pidfd = container.pidfd
        self.reaper = reaper
        self.exit: ExitStatus | None = None
        self.destroyed = False

    def signal(self, signum: int) -> None:
        if self.exit is None:
            self.c.signal(signum)

    def kill(self) -> None:
        self.c.kill()

    def reap(self) -> ExitStatus | None:
        if self.exit is None:
            self.exit = self.c.poll()
            if self.exit is None:
                return None
            self.reaper.disown(self.pid)
        return self.exit

    async def wait(self) -> None:
        await trio.lowlevel.wait_readable(self.pidfd)

    def stats(self) -> Mapping[str, int]:
        return self.c.stats()

    async def teardown(self) -> Released:
        if self.destroyed:
            return {}
        self.destroyed = True
        released = self.c.destroy()
        self.reaper.disown(self.pid)
        return released


def _oom_killed(child: Child, info: ExitStatus) -> bool | None:
    """A container's cgroups count OOM kills; a plain process's exit can't tell: unknown (null)."""
    return info.oom_killed if isinstance(child, ContainerChild) else None


@dataclass(frozen=True)
class _Command:
    event: machine.Event
    done: trio.Event


@dataclass(frozen=True)
class _Timer:
    token: int
    event: machine.Event


@dataclass(frozen=True)
class _Exited:
    child: Child


def _fmt_uptime(secs: float) -> str:
    s = int(secs)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Program:
    def __init__(self, cfg: ProgramConfig, ctx: Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.name = cfg.name
        self.policy = cfg.policy
        self.status = machine.Status()
        self.since = time.time()
        self.child: Child | None = None
        self.started_at = 0.0
        self.last_exit: ExitStatus | None = None
        self.fatal_reason = ""
        self.restarts = 0
        self.logs = ProgramLogs(ctx.log_dir, cfg.name, cfg.stdout_maxbytes, cfg.stdout_backups,
                                cfg.redirect_stderr)
        self._send, self._recv = trio.open_memory_channel[_Command | _Timer | _Exited](math.inf)
        self._changed = trio.Event()
        self._timer_token = 0
        self._timer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._by_operator = False
        self._spawn_due = False  # machine.Spawn seen: carried out by _spawn_pending, outside the lock
        self._killed: Child | None = None
        self.done = trio.Event()

    # -- facts -----------------------------------------------------------------------------------

    @property
    def state(self) -> ProcessState:
        return self.status.state

    @property
    def state_dir(self) -> Path:
        return self.ctx.state_dir / self.name

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def describe(self) -> str:
        st, now = self.state, time.time()
        if st is ProcessState.RUNNING and self.child is not None:
            return f"pid {self.child.pid}, uptime {_fmt_uptime(now - self.started_at)}"
        if st in (ProcessState.STARTING, ProcessState.STOPPING) and self.child is not None:
            return f"pid {self.child.pid}"
        if st is ProcessState.BACKOFF:
            return f"exited too quickly (attempt {self.status.attempt})"
        if st is ProcessState.FATAL:
            return self.fatal_reason
        if self.last_exit is not None and st in (ProcessState.EXITED, ProcessState.STOPPED):
            e = self.last_exit
            how = f"killed by {e.signal_name}" if e.signal else f"exited {e.exit_code}"
            return how
        return ""

    # -- commands (from the daemon / control socket) ---------------------------------------------

    async def command(self, event: machine.Event) -> None:
        """Queue ``event`` and return once the program's machine has taken it. A spawn it calls
        for is still under way then: wait_until() / start() wait for its outcome."""
        done = trio.Event()
        try:
            self._send.send_nowait(_Command(event, done))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        await done.wait()

    async def wait_until(self, pred: Callable[[ProcessState], bool]) -> None:
        while not pred(self.state):
            await self._changed.wait()

    async def start(self) -> None:
        """Start and wait until it leaves STARTING (RUNNING, BACKOFF, FATAL, EXITED, ...)."""
        if self.state is ProcessState.STOPPING:
            await self.wait_until(lambda s: s in STOPPED_STATES)
        if self.state not in (ProcessState.STARTING, ProcessState.RUNNING):
            await self.command(machine.Start())  # from BACKOFF too: an explicit start skips the wait
        await self.wait_until(lambda s: s is not ProcessState.STARTING)

    async def stop(self) -> None:
        """Stop and wait until nothing runs."""
        if self.state in STOPPED_STATES:
            return
        await self.command(machine.Stop())
        await self.wait_until(lambda s: s in STOPPED_STATES)

    async def finish(self) -> None:
        """Stop, then end the program task (used on removal and shutdown)."""
        await self.stop()
        self._send.close()
        await self.done.wait()

    def signal(self, signum: int) -> None:
        if self.child is not None:
            self.child.signal(signum)

    async def adopt(self, child: Child, started_at: float, out_r: int, err_r: int) -> None:
        """Take over a process a previous nsinitd started and the keeper kept: RUNNING with its
        own pid and start time, its output read from the pipes the keeper held (out_r, err_r, or
        -1; owned from here). Its exit, even one the keeper saw before we came, goes through the
        machine as any exit does. Called once, right after the task started."""
        assert self._nursery is not None
        async with self.ctx.spawn_lock:
            self.child = child
            self.started_at = started_at
            self._apply(machine.Adopted())
            self.since = started_at  # RUNNING since then, not since we came back
        for fd, sink in ((out_r, self.logs.stdout), (err_r, self.logs.stderr)):
            if fd >= 0:
                self._nursery.start_soon(pump, fd, sink)
        self._watch(child)

    # -- the task ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async for item in self._recv:
                    await self._handle(item)
                self._cancel_timer()
                # Output pumps end at EOF once every writer is gone; don't wait forever for a
                # stray writer that escaped (only possible without a cgroup).
                nursery.cancel_scope.deadline = trio.current_time() + 2.0
        finally:
            with trio.CancelScope(shield=True):
                if not (self.ctx.keep_running and self.ctx.keeper is not None):
                    await self._ensure_dead()
                self.logs.close()
                self.done.set()

    async def _handle(self, item: _Command | _Timer | _Exited) -> None:
        if isinstance(item, _Command):
            try:
                if machine.allowed(self.state, type(item.event)):
                    async with self.ctx.spawn_lock:
                        self._by_operator = isinstance(item.event, machine.Start)
                        self._apply(item.event)
            finally:
                item.done.set()  # handled: the spawn it may call for goes on below, on our own time
            await self._spawn_pending()
        elif isinstance(item, _Timer):
            if item.token == self._timer_token:
                async with self.ctx.spawn_lock:
                    self._timer_scope = None
                    self._by_operator = False
                    self._apply(item.event)
                await self._spawn_pending()
        elif item.child is self.child:
            info = item.child.reap()
            if info is None:  # not reapable yet (should not happen): watch again
                self._watch(item.child)
                return
            stopping = self.state is ProcessState.STOPPING
            expected = stopping or (info.signal is None and info.exit_code in self.cfg.exitcodes)
            self._emit("program.exited", pid=item.child.pid, exit_code=info.exit_code,
                       signal=info.signal_name, expected=expected, oom_killed=_oom_killed(item.child, info))
            await self._release(item.child, info)
            async with self.ctx.spawn_lock:
                self._by_operator = False
                self._apply(machine.Exited(expected=expected))
            await self._spawn_pending()

    async def _release(self, child: Child, info: ExitStatus) -> None:
        """The incarnation is over: kill its leftovers, release its container/cgroup."""
        self.last_exit = info
        self.child = None
        released: Mapping[str, object] = {}
        if isinstance(child, PlainChild):
            child.teardown_timeout = self.ctx.kill_wait
        try:
            with trio.fail_after(max(TEARDOWN_TIMEOUT, self.ctx.kill_wait * 2)):
                released = dict(await child.teardown())
        except OSError as e:
            released = {"error": e.strerror or str(e)}
        except trio.TooSlowError:
            released = {"error": "teardown timed out"}
        except Exception as e:  # the runtime's own errors
            released = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(child, ContainerChild) or (isinstance(child, GoneChild) and child.container):
            self._emit("container.destroyed", released=released)
        elif "error" in released:
            self._emit("program.teardown_failed", pid=child.pid, error=str(released["error"]))
        remove_pid_files(self.state_dir)
        if self.ctx.keeper is not None:  # its exit is seen and its leftovers gone: the keeper may let go
            self.ctx.keeper.forget_pid(child.pid)  # (a container's exit notice, unread: its PID 1 told us)
            with contextlib.suppress(KeeperError):
                await self.ctx.keeper.call({"op": "forget", "name": self.name})

    def _apply(self, event: machine.Event) -> None:
        old = self.status
        new, actions = machine.step(old, event, self.policy)
        self.status = new
        if new.state is not old.state:
            self.since = time.time()
            self._cancel_timer()
            self._changed.set()
            self._changed = trio.Event()
        for action in actions:
            self._do(action)

    def _do(self, action: machine.Action) -> None:
        if isinstance(action, machine.Emit):
            fields = dict(action.fields)
            if action.event == "program.running":
                fields["pid"] = self.pid
                self.started_at = time.time()
            elif action.event == "program.adopted":  # started_at is the process's, set by adopt()
                fields.update(pid=self.pid, started=round(self.started_at, 3))
            elif action.event == "program.stopping":
                fields.update(pid=self.pid, signal=signal_name(self.cfg.stopsignal))
            elif action.event == "program.fatal":
                self.fatal_reason = fields.get("reason", "")
            self._emit(action.event, **fields)
        elif isinstance(action, machine.Spawn):
            self._spawn_due = True
        elif isinstance(action, machine.SignalStop):
            if self.child is not None:
                self.child.signal(self.cfg.stopsignal)
            self._arm(self.cfg.stopwaitsecs, machine.StopTimeout())
        elif isinstance(action, machine.Kill):
            if self.child is not None:
                if self._killed is not self.child:  # reported once; repeated quietly
                    self._killed = self.child
                    self._emit("program.killing", pid=self.child.pid)
                self.child.kill()
            self._arm(1.0, machine.StopTimeout())  # again, if it is still there in a second
        elif isinstance(action, machine.ScheduleRetry):
            self._arm(action.delay, machine.BackoffElapsed())

    def _emit(self, name: str, **facts: object) -> None:
        self.ctx.bus.emit(name, self.name, **facts)

    # -- timers -----------------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        self._timer_token += 1
        if self._timer_scope is not None:
            self._timer_scope.cancel()
            self._timer_scope = None

    def _arm(self, delay: float, event: machine.Event) -> None:
        self._cancel_timer()
        token = self._timer_token
        scope = trio.CancelScope()
        self._timer_scope = scope
        assert self._nursery is not None
        self._nursery.start_soon(self._fire, scope, delay, _Timer(token, event))

    async def _fire(self, scope: trio.CancelScope, delay: float, item: _Timer) -> None:
        with scope:
            await trio.sleep(delay)
            try:
                self._send.send_nowait(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    # -- spawning ---------------------------------------------------------------------------------

    async def _spawn_pending(self) -> None:
        """Carry out the machine.Spawn the last transition asked for; the result goes back into
        the machine. This program's own events wait meanwhile (its task is here), others' don't."""
        while self._spawn_due:
            self._spawn_due = False
            if not self._by_operator:
                self.restarts += 1
            fatal = False
            try:
                child = await self._spawn_child()
                failure = None
            except SpawnError as e:
                failure = str(e)
            except ContainerConfigError as e:
                failure, fatal = str(e), True
            except Exception as e:  # the runtime's errors (NsRuntimeError ...), one line each
                failure = f"{type(e).__name__}: {e}"
            async with self.ctx.spawn_lock:
                if failure is not None:
                    self._apply(machine.SpawnFailed(reason=failure, fatal=fatal))
                    continue
                self.child = child
                self._watch(child)
                if self.cfg.startsecs <= 0:
                    self._apply(machine.Started())
                else:
                    self._arm(self.cfg.startsecs, machine.Started())

    async def _spawn_child(self) -> Child:
        assert self._nursery is not None
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        enlarge_pipe(out_r)
        if self.cfg.redirect_stderr:
            err_r, err_w = -1, out_w
        else:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            enlarge_pipe(err_r)
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        keeper = self.ctx.keeper
        held = [fd for fd in (out_r, err_r) if fd >= 0]
        try:
            self.logs.ensure()
            env = {**self.ctx.base_env, **self.cfg.env}
            if self.cfg.container is not None or self.cfg.bundle is not None:
                child: Child = await self._spawn_container((devnull, out_w, err_w), self.cfg.env)
                if keeper is not None and isinstance(child, ContainerChild):
                    await self._hold(keeper, child, held)
            else:
                cgroup = Cgroup(self.ctx.cgroup_root / self.name) if self.ctx.cgroup_root else None
                if keeper is not None:
                    # not under the spawn lock: the keeper's client takes the requests in turn, and
                    # other programs' transitions (exits, stops) go on while the keeper forks
                    child = await spawn_kept(keeper, self.cfg, env, (devnull, out_w, err_w), held,
                                             self._log_paths(), cgroup)
                else:
                    async with self.ctx.spawn_lock:
                        child = spawn_plain(self.cfg.command, env, (devnull, out_w, err_w), self.ctx.reaper, cgroup)
                try:
                    write_pid_files(self.state_dir, child.pid)
                except OSError:
                    pass
        except BaseException:
            for fd in (out_r, err_r):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in {out_w, err_w, devnull}:
                os.close(fd)
        self._nursery.start_soon(pump, out_r, self.logs.stdout)
        if err_r >= 0:
            self._nursery.start_soon(pump, err_r, self.logs.stderr)
        return child

    def _log_paths(self) -> dict[str, str]:
        """Where the keeper appends a stream's output while no nsinitd reads it."""
        paths = {"out": str(self.logs.path("stdout"))}
        if not self.cfg.redirect_stderr:
            paths["err"] = str(self.logs.path("stderr"))
        return paths

    async def _hold(self, keeper: KeeperClient, child: ContainerChild, held: list[int]) -> None:
        """Hand the keeper copies of what nsinitd's death must not close: the pipes' read ends and
        the control socket (PID 1's report of the command's status). Without them, the container
        is killed: it could not outlive nsinitd as promised."""
        names = [*("out", "err")[: len(held)], "ctl"]
        msg = {"op": "hold", "name": self.name, "pid": child.pid, "digest": config_digest(self.cfg),
               "logs": self._log_paths(), "fds": names}
        try:
            reply, _ = await keeper.call(msg, [*held, child.c.control_fd])
            if not reply.get("ok"):
                raise KeeperError(str(reply.get("error")))
        except KeeperError as e:
            child.kill()
            await child.teardown()
            raise SpawnError(f"keeper: {e}") from None

    async def _spawn_container(self, stdio: tuple[int, int, int], env: dict[str, str]) -> Child:
        spawner = self.ctx.spawner
        try:  # checked when nsinitd read its config too, but the file may have changed since
            if self.cfg.bundle is not None:  # an OCI bundle: its config.json and its root
                from .config import ConfigError as SupervisorConfigError
                from .config import load_bundle

                try:
                    sp = load_bundle(f"programs.{self.name}.bundle", self.cfg.bundle)
                except SupervisorConfigError as e:
                    raise ContainerConfigError(str(e)) from None
                from nsruntime import replace_config as replace

                # recorded in nsrun's shape, so that a join (nsinitctl exec) reads it as config.json
                source = {"nsrun": {"bundle": str(self.cfg.bundle)}, "spec": sp.config.source}
                cfg = replace(sp.config, source=source)
                rootfs = Path(sp.rootfs)
            else:
                assert self.cfg.container is not None
                cfg, rootfs = spawner.load(self.cfg.container / "container.json"), self.cfg.container
        except ConfigError as e:
            raise ContainerConfigError(f"{type(e).__name__}: {e}") from None
        await self._reclaim_stale()
        async with self.ctx.spawn_lock:
            making = spawner.begin(cfg, rootfs, self.cfg.command, self.state_dir, env=env, stdio=stdio)
        c = await _finish_create(making)
        self.ctx.reaper.own(c.pid)
        child = ContainerChild(c, self.ctx.reaper)
        try:
            c.start()
        except BaseException:
            c.kill()
            c.destroy()
            self.ctx.reaper.disown(c.pid)
            raise
        self._emit("container.created", host_pid=c.pid, container=str(self.cfg.container or self.cfg.bundle),
                   namespaces=list(cfg.namespaces))
        return child

    async def _reclaim_stale(self) -> None:
        """Kill a live container a previous nsinitd (killed with SIGKILL) left in our state dir.

        The spawner hands its PID 1 over as a pidfd, checked to be that process, so a reused pid
        is never killed. create() then releases what it recorded.
        """
        stale = self.ctx.spawner.find_stale(self.state_dir)
        if stale is None:
            return
        try:
            _signal.pidfd_send_signal(stale.pidfd, _signal.SIGKILL)  # PID 1: the whole pid namespace goes
            with trio.move_on_after(KILL_WAIT):  # on the loop's time: other programs carry on
                await trio.lowlevel.wait_readable(stale.pidfd)
        finally:
            os.close(stale.pidfd)
        self._emit("container.reclaimed", host_pid=stale.pid, action="killed",
                   reason="left running by a previous nsinitd")

    def _watch(self, child: Child) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_task, child)

    async def _watch_task(self, child: Child) -> None:
        await wait_exit(child)
        try:
            self._send.send_nowait(_Exited(child))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    # -- the safety net ---------------------------------------------------------------------------

    async def _ensure_dead(self) -> None:
        """Stop whatever still runs, bounded; called shielded from ``run``'s finally."""
        child = self.child
        if child is None:
            return
        info = child.reap()
        if info is None:
            if self.state is not ProcessState.STOPPING:
                self._emit("program.stopping", pid=child.pid, signal=signal_name(self.cfg.stopsignal))
                child.signal(self.cfg.stopsignal)
            with trio.move_on_after(self.cfg.stopwaitsecs):
                await wait_exit(child)
            info = child.reap()
            if info is None:
                if self._killed is not child:
                    self._emit("program.killing", pid=child.pid)
                child.kill()
                with trio.move_on_after(self.ctx.kill_wait):
                    await wait_exit(child)
                info = child.reap()
        if info is None:
            # Unkillable (D state, a frozen v1 cgroup): say which process and in what state, and
            # let go. The stranger reaper collects it if it ever dies.
            self.ctx.reaper.disown(child.pid)
            self._emit("program.stuck", pid=child.pid, state=proc_state(child.pid),
                       reason=f"still there {self.ctx.kill_wait:g}s after SIGKILL")
            info = ExitStatus(128 + int(_signal.SIGKILL), int(_signal.SIGKILL))
        else:
            self._emit("program.exited", pid=child.pid, exit_code=info.exit_code, signal=info.signal_name,
                       expected=True, oom_killed=_oom_killed(child, info))
        await self._release(child, info)
        self.status = machine.Status(ProcessState.STOPPED, Wanted.DOWN, 0)
        self.since = time.time()
        self._changed.set()
        self._emit("program.stopped")


async def _finish_create(making: Creation) -> Created:
    """Drive a Creation's handshake from the event loop: other programs' containers come up
    meanwhile. Cancelled or failed, the half-made container is released."""
    try:
        while True:
            with trio.move_on_at(trio.current_time() + max(0.0, making.deadline - time.monotonic())):
                await trio.lowlevel.wait_readable(making.fd)
            if time.monotonic() >= making.deadline:
                making.time_out()
            c = making.step()
            if c is not None:
                return c
    except BaseException:
        making.abort()
        raise
