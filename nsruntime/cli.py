"""nsinit: run a command in a new container made from the current directory, or join it.

    nsinit [--root DIR] exec [--] CMD [ARG...]   run CMD in the container (join it if it lives)
    nsinit [--root DIR] state                    print the container's state as JSON
    nsinit [--root DIR] kill [SIGNAL]            signal the container's command (TERM by default)
    nsinit [--root DIR] delete [--force]         release what a dead container left (cgroups, links,
                                                 records); --force kills a live one first
    nsinit --help | --version

The rootfs is the current directory. Its container.json is read from it, or from DIR with
--root. The container's records (pid, start time, state.json) are kept where the container
cannot rewrite them: in DIR with --root (DIR must not be inside the rootfs), else in
$NSINIT_STATE_ROOT/ID (/run/nsinit-exec/ID when the variable is unset), ID derived from the
rootfs's real path; that directory goes when the container is deleted. A copy of the pid is
written to ./pid when there is no --root, for users: nsinit never reads it.

Exit status: the command's (128+N when killed by signal N); 0 for state, kill and delete when
done; 1 for state and kill with no live container and for delete of a live one without --force;
2 for a usage error (a usage line and "nsinit: error: ..." on stderr); 125 when nsinit failed
(bad container.json, setup failure: one line on stderr names the field, step, path or call);
126 when the command is not executable; 127 when it is not found.

The command line of ``exec`` is parsed by hand (argparse imports re and gettext: a few ms on
every start); everything else, and every error, goes through argparse, which gives the same
answer for what the fast path takes (tests/runtime/test_cli.py checks both).
"""

from __future__ import annotations

import gc
import os
import sys

from . import init, libc
from .errors import EXIT_RUNTIME_FAILED, NsRuntimeError, StateError
from .lean import dumps, suppress
from .state import PID_FILE, StateDir, derive_id, is_within, state_root

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

EXIT_USAGE = 2
USAGE = """nsinit [--root DIR] exec [--] CMD [ARG...]
       nsinit [--root DIR] state
       nsinit [--root DIR] kill [SIGNAL]
       nsinit [--root DIR] delete [--force]
       nsinit --help | --version"""
DESCRIPTION = """\
Run a command in a container made from the current directory (its rootfs), or in the
container already running there.

verbs:
  exec CMD [ARG...]  run CMD in the container; joins it when it is already running
                     (what follows CMD is CMD's; put -- before a CMD that starts with -)
  state              print the container's state as JSON (the OCI state verb's shape)
  kill [SIGNAL]      send SIGNAL to the container's command: a name (TERM, SIGUSR1) or a
                     number; TERM by default
  delete [--force]   release what a dead container left behind (cgroups, links, records);
                     --force kills a running one first"""
EPILOG = """\
where things are:
  container.json is read from the current directory, or from DIR with --root. The container's
  records (pid, start time, state.json) are kept where the container cannot rewrite them: in
  DIR with --root (DIR must not be inside the current directory), else in
  $NSINIT_STATE_ROOT/ID (/run/nsinit-exec/ID by default), ID derived from the rootfs's path.
  Without --root, ./pid holds PID 1's host pid for convenience; nsinit never reads it.

exit status:
  N     exec: the command's exit status; 128+N when signal N killed it
  0     state, kill, delete: done
  1     state, kill: no running container; delete: the container runs (use --force)
  2     usage error
  125   nsinit failed (bad container.json, setup failure): one line on stderr says what
  126   exec: the command is not executable
  127   exec: the command was not found"""


def _err(msg: str, code: int = EXIT_RUNTIME_FAILED) -> int:
    sys.stderr.write(f"nsinit: {msg}\n")
    return code


def _version() -> str:
    from . import __version__  # the one version string (nsinit and nsinitd ship together)

    return __version__


def _parser() -> argparse.ArgumentParser:
    import argparse

    def sub(name: str, usage: str, description: str) -> argparse.ArgumentParser:
        # prog "nsinit": errors read "nsinit: error: ..." whatever the verb
        return verbs.add_parser(name, prog="nsinit", usage=usage, description=description, add_help=True,
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)

    p = argparse.ArgumentParser(prog="nsinit", usage=USAGE, description=DESCRIPTION, epilog=EPILOG,
                                allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", metavar="DIR", help="read container.json from DIR and keep the records there")
    p.add_argument("--version", action="version", version=f"nsinit {_version()}")
    # the verbs are described in DESCRIPTION already: not a second time as a positional argument
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True, help=argparse.SUPPRESS)
    e = sub("exec", "nsinit [--root DIR] exec [--] CMD [ARG...]",
            "Run CMD in the container made from the current directory, or join the one running there.\n"
            "What follows CMD is CMD's; put -- before a CMD that starts with -.")
    e.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD [ARG...]", help=argparse.SUPPRESS)
    sub("state", "nsinit [--root DIR] state", "Print the container's state as JSON; exit 1 when it does not run.")
    k = sub("kill", "nsinit [--root DIR] kill [SIGNAL]",
            "Send SIGNAL (a name such as TERM or SIGUSR1, or a number; TERM by default) to the container's "
            "command.")
    k.add_argument("signal", nargs="?", default="TERM", metavar="SIGNAL", help=argparse.SUPPRESS)
    d = sub("delete", "nsinit [--root DIR] delete [--force]",
            "Release what a dead container left behind: its cgroups, host links and records.")
    d.add_argument("--force", action="store_true", help="kill a running container first")
    return p


class Args:
    """What the command line asks for."""

    def __init__(self, root: str | None, verb: str, command: list[str], signal: str = "TERM",
                 force: bool = False) -> None:
        self.root = root
        self.verb = verb
        self.command = command
        self.signal = signal
        self.force = force

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Args) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Args({vars(self)!r})"


def parse_fast(argv: list[str]) -> Args | None:
    """``[--root DIR] exec [--] CMD [ARG...]`` without argparse; None for anything else (parse
    that with parse_full, which gives the same Args for whatever this takes)."""
    root = None
    i = 0
    if argv[:1] == ["--root"] and len(argv) > 1 and argv[1] and not argv[1].startswith("-"):
        root, i = argv[1], 2
    elif argv[:1] and argv[0].startswith("--root=") and len(argv[0]) > len("--root="):
        root, i = argv[0][len("--root=") :], 1
    if argv[i : i + 1] != ["exec"]:
        return None
    command = argv[i + 1 :]
    if command[:1] == ["--"]:
        command = command[1:]
    elif command[:1] and command[0].startswith("-"):
        return None
    if not command:
        return None
    return Args(root, "exec", command)


def parse_full(argv: list[str]) -> Args:
    """argparse's reading of argv; SystemExit (0 after --help/--version, 2 on a usage error)."""
    p = _parser()
    ns = p.parse_args(argv)
    if ns.root == "":
        p.error("argument --root: expected a directory, got an empty string")
    if ns.verb != "exec":
        return Args(ns.root, ns.verb, [], signal=getattr(ns, "signal", "TERM"), force=getattr(ns, "force", False))
    command = list(ns.command)
    if command[:1] == ["--"]:
        command = command[1:]
    elif command[:1] and command[0].startswith("-"):
        p.error(f"exec: unrecognized option {command[0]} (put -- before a command that starts with -)")
    if not command:
        p.error("exec: no command given")
    return Args(ns.root, "exec", command)


def _records(rootfs: str, root_opt: str | None) -> StateDir:
    """Where the container's records are: DIR of --root, else nsinit's own directory for this rootfs."""
    if root_opt is not None:
        path = os.path.realpath(root_opt)
        if is_within(path, rootfs):
            raise StateError(f"--root {path} is inside the rootfs {rootfs} (the current directory), where the "
                             "container could rewrite its records: use a directory outside it")
        return StateDir(path)
    base = state_root()
    os.makedirs(base, mode=0o700, exist_ok=True)
    return StateDir(os.path.join(base, derive_id(rootfs)), remove_dir=True)


def _exec(rootfs: str, args: Args) -> int:
    from . import creator, joiner
    from .config import load

    if rootfs == "/":
        return _err("the rootfs is the current directory (/), the host's root: cd to the container's root "
                    "directory (the one holding its /bin, /etc...) and run nsinit from there")
    sdir = _records(rootfs, args.root)
    # blocked from here on and read from a signalfd: nothing sent to us is lost or kills us halfway
    init.block_signals()
    sigfd = libc.signalfd(init.ALL_SIGNALS, libc.SFD_CLOEXEC | libc.SFD_NONBLOCK)
    if sdir.live_pid() is None:
        # read only to make a container: a join takes the config recorded when it was made
        cfg = load(os.path.join(sdir.path if args.root is not None else rootfs, "container.json"))
        try:
            # started at once (a terminal still waits for raw mode and its size before start())
            c = creator.create(cfg, rootfs, args.command, sdir, die_with_parent=True, start=True,
                              pid_file=None if args.root is not None else os.path.join(rootfs, PID_FILE))
        except StateError:
            if sdir.live_pid() is None:
                raise
            c = None  # somebody made it meanwhile: join theirs
        if c is not None:
            try:
                if c.console is not None:
                    from . import console  # termios and tty: only for a terminal

                    with console.raw_mode(0):
                        console.copy_winsize(0, c.console)
                        c.start()
                        joiner.forward_until_exit(sigfd, c.pidfd, c.signal, c.console)
                else:
                    c.start()
                    joiner.forward_until_exit(sigfd, c.pidfd, c.signal, None)
                status = c.poll()
            finally:
                c.destroy()
            assert status is not None
            return status.exit_code
    os.close(sigfd)
    return joiner.join(sdir, args.command)


def _kill(sdir: StateDir, sig: str) -> int:
    from .signals import signal_number

    signum = int(sig) if sig.isdigit() else signal_number(sig)
    if signum is None:
        return _err(f'kill: unknown signal "{sig}"')
    live = sdir.open_live()
    if live is None:
        return _err(f"{sdir.path}: no live container", 1)
    pid, pidfd = live
    try:
        if not libc.pidfd_send_signal(pidfd, signum):
            return _err(f"{sdir.path}: no live container (pid {pid} exited)", 1)
    finally:
        os.close(pidfd)
    return 0


def _delete(sdir: StateDir, force: bool) -> int:
    from .creator import cleanup_stale
    from .state import proc_state

    live = sdir.open_live()
    if live is not None:
        pid, pidfd = live
        try:
            if not force:
                return _err(f"{sdir.path}: the container is running (pid {pid}); use delete --force", 1)
            # SIGKILL to PID 1: the kernel takes the whole pid namespace with it
            libc.pidfd_send_signal(pidfd, 9)
            if not libc.wait_readable(pidfd, 5.0):
                return _err(f"{sdir.path}: pid {pid} is {proc_state(pid)} 5 s after SIGKILL")
        finally:
            os.close(pidfd)
    released = cleanup_stale(sdir)
    print(dumps(released))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run nsinit; as the console script (argv None) it leaves through os._exit once done."""
    if argv is None:
        gc.disable()  # a one-shot process: collections would only cost start time
        _open_closed_stdio()
        code = _main(sys.argv[1:])
        # skip the interpreter's finalization of every imported module: ~15 ms of a cold start
        for stream in (sys.stdout, sys.stderr):  # None when started with that descriptor closed
            if stream is not None:
                with suppress(OSError, ValueError):
                    stream.flush()
        os._exit(code)
    return _main(argv)


def _open_closed_stdio() -> None:
    """Open /dev/null as 0, 1 or 2 where the caller left it closed (`nsinit exec CMD >&-`).

    Otherwise the first descriptor nsinit opens takes that number (the state directory, a socket)
    and the command inherits it as its stdin, stdout or stderr: writes fail with EBADF, reads
    hit nsinit's own files. Go's runtime and glibc (for set-id programs) do the same at start."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd, 0 and 1 being open
            if null != fd:
                os.dup2(null, fd, inheritable=True)
                os.close(null)
            else:
                os.set_inheritable(fd, True)


def _main(argv: list[str]) -> int:
    args = parse_fast(argv)
    if args is None:
        try:
            args = parse_full(argv)
        except SystemExit as e:  # --help, --version (0) or a usage error (2), already printed
            return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        rootfs = os.path.realpath(os.getcwd())
        if args.verb == "exec":
            return _exec(rootfs, args)
        sdir = _records(rootfs, args.root)
        if args.verb == "state":
            import json

            from .container import describe

            state = describe(sdir)
            print(json.dumps(state, indent=1))
            return 0 if state["status"] == "running" else 1
        if args.verb == "kill":
            return _kill(sdir, args.signal)
        assert args.verb == "delete"
        return _delete(sdir, args.force)
    except NsRuntimeError as e:
        return _err(str(e))
    except OSError as e:
        return _err(f"{e.filename or ''}: {e.strerror}" if e.filename else str(e))


if __name__ == "__main__":
    sys.exit(main())
