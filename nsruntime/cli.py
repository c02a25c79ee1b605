"""``nsinit``: run a command in a new container made from the current directory, or join it.

    nsinit [--root DIR] exec [--] CMD [ARG...]   run CMD in the container (join it if it lives)
    nsinit [--root DIR] state                    print the container's state as JSON
    nsinit [--root DIR] kill [SIGNAL]            signal the container's command (TERM by default)
    nsinit [--root DIR] delete [--force]         release what a dead container left (cgroups, links,
                                                 pid files); --force kills a live one first

The rootfs is the current directory; container.json and the pid/start/state.json files are in
the current directory too, or in DIR with --root.

Exit status: the command's (128+N when killed by signal N); 125 when nsinit failed (bad
container.json, setup failure: one line on stderr names the field, step, path or call); 126 when
the command is not executable; 127 when it is not found; 1 for state/kill with no live container
and for delete of a live one without --force.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from . import init, libc
from .errors import EXIT_RUNTIME_FAILED, NsRuntimeError, StateError
from .lean import dumps, suppress
from .state import StateDir

USAGE = "usage: nsinit [--root DIR] {exec [--] CMD [ARG...] | state | kill [SIGNAL] | delete [--force]}"


def _err(msg: str, code: int = EXIT_RUNTIME_FAILED) -> int:
    sys.stderr.write(f"nsinit: {msg}\n")
    return code


def _parse(argv: list[str]) -> tuple[str | None, str, list[str]]:
    # a hand-made parser: exec's arguments belong to the command, whatever they look like
    root = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--root" and i + 1 < len(argv):
            root = argv[i + 1]
            i += 2
        elif a.startswith("--root="):
            root = a.split("=", 1)[1]
            i += 1
        elif a in ("-h", "--help"):
            raise SystemExit(print(__doc__) or 0)
        else:
            break
    if i >= len(argv):
        raise ValueError("no verb")
    verb, rest = argv[i], argv[i + 1 :]
    if verb == "exec" and rest[:1] == ["--"]:
        rest = rest[1:]
    return root, verb, rest


def _exec(root: str, command: list[str]) -> int:
    from . import container
    from .config import load

    if not command:
        return _err("exec: no command given")
    cfg = load(os.path.join(root, "container.json"))
    # blocked from here on and read from a signalfd: nothing sent to us is lost or kills us halfway
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    sdir = StateDir(root)
    if sdir.live_pid() is None:
        try:
            # started at once (a terminal still waits for raw mode and its size before start())
            c = container.create(cfg, os.getcwd(), command, root, die_with_parent=True, start=True)
        except StateError:
            c = None  # somebody made it meanwhile: join theirs
        if c is not None:
            try:
                if c.console is not None:
                    from . import console  # termios and tty: only for a terminal

                    with console.raw_mode(0):
                        console.copy_winsize(0, c.console)
                        c.start()
                        container.forward_until_exit(sigfd, c.pidfd, c.signal, c.console)
                else:
                    c.start()
                    container.forward_until_exit(sigfd, c.pidfd, c.signal, None)
                status = c.poll()
            finally:
                c.destroy()
            assert status is not None
            return status.exit_code
    os.close(sigfd)
    return container.join(root, command)


def _delete(root: str, force: bool) -> int:
    from . import container

    sdir = StateDir(root)
    pid = sdir.live_pid()
    if pid is not None:
        if not force:
            return _err(f"{root}: the container is running (pid {pid}); use delete --force", 1)
        with suppress(ProcessLookupError):
            os.kill(pid, 9)  # SIGKILL to PID 1: the kernel takes the whole pid namespace with it
        for _ in range(500):
            if sdir.live_pid() is None:
                break
            time.sleep(0.01)
        else:
            return _err(f"{root}: pid {pid} is {container.proc_state(pid)} after SIGKILL")
    released = container.cleanup_stale(sdir)
    print(dumps(released))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run nsinit; as the console script (argv None) it leaves through os._exit once done."""
    if argv is None:
        gc.disable()  # a one-shot process: collections would only cost start time
        code = _main(sys.argv[1:])
        # skip the interpreter's finalization of every imported module: ~15 ms of a cold start
        with suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return _main(argv)


def _main(args: list[str]) -> int:
    try:
        root_opt, verb, rest = _parse(args)
    except ValueError:
        return _err(USAGE)
    root = os.path.realpath(root_opt or os.getcwd())
    try:
        if verb == "exec":
            return _exec(root, rest)
        if verb == "state":
            import json

            from .container import describe

            print(json.dumps(describe(root), indent=1))
            return 0 if StateDir(root).live_pid() else 1
        if verb == "kill":
            import signal

            sig = rest[0] if rest else "TERM"
            try:
                signum = int(sig) if sig.isdigit() else signal.Signals["SIG" + sig.upper().removeprefix("SIG")]
            except KeyError:
                return _err(f'kill: unknown signal "{sig}"')
            pid = StateDir(root).live_pid()
            if pid is None:
                return _err(f"{root}: no live container", 1)
            os.kill(pid, signum)
            return 0
        if verb == "delete":
            return _delete(root, force=rest == ["--force"])
        return _err(f'unknown verb "{verb}"\n{USAGE}')
    except NsRuntimeError as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{e.filename or ''}: {e.strerror}" if e.filename else str(e))


if __name__ == "__main__":
    sys.exit(main())
