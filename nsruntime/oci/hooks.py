"""OCI hooks (runtime-spec 1.0-1.2 ``hooks``): parse them, run them with the state on stdin.

Each hook is one process: ``path`` executed with ``args`` as its argv (``[path]`` when absent) and
``env`` as its whole environment (the caller's own when absent, as runc does; ``[]`` is empty),
in a process group of its own, with default signal dispositions and an empty signal mask, and
only stdin, stdout and stderr open. Its stdin is the container's state JSON (a memfd: a hook that
never reads it can't block us); its stdout and stderr are captured (the first 64 KiB of each).
With ``timeout`` (seconds), the whole process group is killed (SIGKILL) when it runs out.

A failure is one line naming the kind, the index and the path, e.g.
``hooks.prestart[0] /usr/bin/x: exited 3``, plus the last line the hook wrote on stderr.
What a failure means is the spec's, and the caller's to carry out (see run_kind):

- prestart, createRuntime, createContainer, startContainer: the first failure stops the list
  (HookError); the caller stops the container and goes on with delete (create or start fails).
- poststart, poststop: every hook runs; failures come back as a list to be reported as
  warnings, and the lifecycle goes on as if they had succeeded.

Every process started here is waited for on every way out (success, failure, timeout, an
exception in the caller's thread such as KeyboardInterrupt). Processes a hook leaves running in
its group after it exits are its own business, unless the timeout fires first.

Where hooks run is the caller's choice: run() executes in the calling process's namespaces.
createContainer and startContainer belong in the container's namespaces: call run() from a
process there. This module imports only the standard library's C-level modules and nsruntime's
own, all before the first call, so it works after pivot_root too.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import time

from .. import init, libc
from ..errors import ConfigError, NsRuntimeError
from ..fields import _int, _list, _obj, _str
from ..lean import dumps, frozen, loads, suppress
from ..signals import signal_name

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Mapping, Sequence
else:  # the C module: signal.py builds enums at import (see lean.py)
    import _signal as signal

KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
FATAL = frozenset({"prestart", "createRuntime", "createContainer", "startContainer"})  # the rest: warnings
MAX_OUTPUT = 1 << 16  # bytes of stdout and of stderr kept per hook; the rest is read and dropped
_HOOK_FIELDS = {"path", "args", "env", "timeout"}
_SHOWN = 200  # characters of the hook's stderr line echoed in an error


@frozen
class Hook:
    path: str
    args: tuple[str, ...] = ()  # argv; () means (path,)
    env: tuple[str, ...] | None = None  # NAME=VALUE each; None: the caller's environment
    timeout: int | None = None  # seconds


@frozen
class Output:
    """What a hook that succeeded wrote."""

    stdout: bytes
    stderr: bytes


class HookError(NsRuntimeError):
    """A hook failed: ``hooks.prestart[0] /usr/bin/x: exited 3``. Carries what it wrote."""

    def __init__(self, kind: str, index: int, path: str, reason: str, stdout: bytes = b"",
                 stderr: bytes = b"") -> None:
        last = next((line for line in reversed(stderr.decode(errors="replace").splitlines()) if line.strip()), "")
        said = f" (stderr: {dumps(last[:_SHOWN])})" if last else ""
        super().__init__(f"hooks.{kind}[{index}] {path}: {reason}{said}")
        self.kind = kind
        self.index = index
        self.path = path
        self.reason = reason
        self.stdout = stdout
        self.stderr = stderr


def parse(obj: object, path: str = "hooks") -> dict[str, tuple[Hook, ...]]:
    """The ``hooks`` object of a config.json: every kind present, in order; ConfigError naming
    the field (``hooks.poststop[1].timeout: ...``)."""
    d = _obj(path, obj, set(KINDS))
    out: dict[str, tuple[Hook, ...]] = {}
    for kind in KINDS:
        if d.get(kind) is None:
            continue
        hooks: list[Hook] = []
        for i, item in enumerate(_list(f"{path}.{kind}", d[kind])):
            p = f"{path}.{kind}[{i}]"
            h = _obj(p, item, _HOOK_FIELDS)
            if h.get("path") is None:
                raise ConfigError(f"{p}.path", "required")
            exe = _str(f"{p}.path", h["path"])
            if not exe.startswith("/"):
                raise ConfigError(f"{p}.path", f"{dumps(exe)} is not an absolute path")
            arg_list = _list(f"{p}.args", h.get("args") or [])
            args = tuple(_str(f"{p}.args[{j}]", a, empty=True) for j, a in enumerate(arg_list))
            env = None
            if h.get("env") is not None:
                env = tuple(_str(f"{p}.env[{j}]", e) for j, e in enumerate(_list(f"{p}.env", h["env"])))
                for j, e in enumerate(env):
                    if "=" not in e or e.startswith("="):
                        raise ConfigError(f"{p}.env[{j}]", f"{dumps(e)} is not NAME=VALUE")
            timeout = None if h.get("timeout") is None else _int(f"{p}.timeout", h["timeout"], 1)
            hooks.append(Hook(exe, args, env, timeout))
        out[kind] = tuple(hooks)
    return out


def run_kind(kind: str, hooks: Sequence[Hook], state: bytes | Mapping[str, object]) -> list[HookError]:
    """Run the hooks of one kind in order, with the spec's rule for failures: for prestart,
    createRuntime, createContainer and startContainer the first failure raises HookError (the
    rest don't run); for poststart and poststop all run and the failures are returned."""
    if kind not in KINDS:
        raise ValueError(f"not a hook kind: {kind!r}")
    data = state if isinstance(state, bytes) else dumps(state).encode()
    failed: list[HookError] = []
    for i, hook in enumerate(hooks):
        try:
            run(kind, i, hook, data)
        except HookError as e:
            if kind in FATAL:
                raise
            failed.append(e)
    return failed


def run(kind: str, index: int, hook: Hook, state: bytes) -> Output:
    """Run one hook with ``state`` on its stdin and wait for it (at most its timeout); its output,
    or HookError (not executable, exited non-zero, killed, timed out)."""
    where = (kind, index, hook.path)
    stdin = os.memfd_create("oci-state", os.MFD_CLOEXEC)
    out_r = err_r = -1
    pid = pidfd = -1
    try:
        os.write(stdin, state)
        os.lseek(stdin, 0, os.SEEK_SET)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        exec_r, exec_w = os.pipe2(os.O_CLOEXEC)  # the child's exec errno; EOF when exec succeeded
        argv = list(hook.args) or [hook.path]
        env = dict(os.environ) if hook.env is None else dict(e.split("=", 1) for e in hook.env)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                _child(hook.path, argv, env, (stdin, out_w, err_w), exec_w)
        finally:
            for fd in (out_w, err_w, exec_w):
                os.close(fd)
        with suppress(OSError):
            os.setpgid(pid, pid)  # as the child does: whichever runs first, the group exists
        err = _read_exec_error(exec_r)
        if err:
            _reap(pid)
            pid = -1
            raise HookError(*where, f"cannot execute: {os.strerror(err)}")
        pidfd = os.pidfd_open(pid)
        status, out, errs = _wait(pid, pidfd, out_r, err_r, hook.timeout)
        pid = -1
        if status is None:
            raise HookError(*where, f"timed out after {hook.timeout} s (its process group was killed)", out, errs)
        if os.WIFSIGNALED(status):
            raise HookError(*where, f"killed by {signal_name(os.WTERMSIG(status))}", out, errs)
        code = os.WEXITSTATUS(status)
        if code != 0:
            raise HookError(*where, f"exited {code}", out, errs)
        return Output(out, errs)
    finally:
        if pid > 0:  # an exception of ours (or the caller's KeyboardInterrupt) while it ran
            with suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            _reap(pid)
        for fd in (stdin, out_r, err_r, pidfd):
            if fd >= 0:
                os.close(fd)


def _child(path: str, argv: list[str], env: dict[str, str], stdio: tuple[int, int, int], exec_w: int) -> None:
    """In the forked child: a group of its own, clean signals, stdio only, exec; never returns."""
    try:
        os.setpgid(0, 0)
        init.reset_signals()
        # above 2 first: a caller without stdio may have had 0-2 handed out to these very fds
        exec_w = fcntl.fcntl(exec_w, fcntl.F_DUPFD_CLOEXEC, 3)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in stdio]
        for n, fd in enumerate(high):
            os.dup2(fd, n)  # the copy is inheritable
        libc.close_range(3, exec_w - 1)
        libc.close_range(exec_w + 1)
        os.execve(path, argv, env)
    except OSError as e:
        with suppress(OSError):
            os.write(exec_w, str(e.errno or errno.EIO).encode())
    except BaseException:
        with suppress(OSError):
            os.write(exec_w, str(errno.EIO).encode())
    os._exit(127)


def _read_exec_error(fd: int) -> int:
    try:
        data = b""
        while chunk := os.read(fd, 16):
            data += chunk
    finally:
        os.close(fd)
    return int(data) if data else 0


def _reap(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _wait(pid: int, pidfd: int, out_r: int, err_r: int, timeout: int | None) -> tuple[int | None, bytes, bytes]:
    """Read the hook's output until it exits or its time is up; reap it. (wait status, or None
    when it timed out and its group was killed; stdout; stderr). Output still buffered in the
    pipes when it exits is read; a process of its group that keeps a pipe open is not waited for."""
    deadline = None if timeout is None else time.monotonic() + timeout
    bufs = {out_r: bytearray(), err_r: bytearray()}
    poller = select.poll()
    for fd in (pidfd, out_r, err_r):
        poller.register(fd, select.POLLIN)
    open_fds = {out_r, err_r}
    timed_out = False
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            timed_out = True
            break
        events = poller.poll(None if left is None else max(1, int(left * 1000 + 0.5)))
        exited = False
        for fd, _ev in events:
            if fd == pidfd:
                exited = True
            elif not _drain(fd, bufs[fd], block=True):
                poller.unregister(fd)
                open_fds.discard(fd)
        if exited:
            break
    if timed_out:
        with suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _reap(pid)
        status = None
    else:
        status = _reap(pid)
    for fd in open_fds:  # what it wrote before it exited is in the pipe: never wait for more
        os.set_blocking(fd, False)
        _drain(fd, bufs[fd], block=False)
    return status, bytes(bufs[out_r]), bytes(bufs[err_r])


def _drain(fd: int, buf: bytearray, *, block: bool) -> bool:
    """Read what fd holds into buf (up to MAX_OUTPUT, the rest dropped); False at EOF."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        buf += chunk[: max(0, MAX_OUTPUT - len(buf))]
        if block:  # one read per readiness: poll says when there is more
            return True


class SpecHooks:
    """A container's hooks at nsruntime's lifecycle points (nsruntime.spawn.Lifecycle).

    prestart then createRuntime run in the runtime's namespaces (the creator) once the
    container's namespaces and mounts exist and before its root is switched; createContainer in
    the container's namespaces at the same point (its paths: the host's, as the root is not yet
    switched); startContainer in the container, in its root, after `start` and before the
    command's execve. The state they read says ``creating``, then ``created`` for startContainer,
    with PID 1's host pid. poststart and poststop are the OCI verbs' to run (run_kind).
    """

    def __init__(self, hooks: Mapping[str, Sequence[Hook]], state: Mapping[str, object],
                 reply_fifo: str | None = None) -> None:
        self.hooks = {kind: tuple(hooks.get(kind) or ()) for kind in KINDS}
        self.state = dict(state)
        self.reply_fifo = reply_fifo if self.hooks["startContainer"] else None
        # createContainer runs while the creator waits for Ready: its timeouts extend that wait
        self.setup_time = float(sum(h.timeout or 0 for h in self.hooks["createContainer"]))

    @property
    def needed(self) -> bool:
        """Whether any hook runs at a point of the container's setup (else no step is added)."""
        return any(self.hooks[k] for k in ("prestart", "createRuntime", "createContainer", "startContainer"))

    def runtime(self, pid: int) -> str:
        state = dumps({**self.state, "pid": pid, "status": "creating"})
        run_kind("prestart", self.hooks["prestart"], state.encode())
        run_kind("createRuntime", self.hooks["createRuntime"], state.encode())
        return state

    def creating(self, state: str) -> None:
        run_kind("createContainer", self.hooks["createContainer"], state.encode())

    def starting(self, state: str) -> None:
        if self.hooks["startContainer"]:
            created = dumps({**loads(state), "status": "created"})
            run_kind("startContainer", self.hooks["startContainer"], created.encode())

