"""nsrun: an OCI runtime with runc's command line, over nsruntime.

    nsrun [GLOBAL FLAGS] VERB [FLAGS] ID ...

Global flags come before the verb: --root DIR (the containers' state, default /run/nsrun),
--log FILE, --log-format text|json, --systemd-cgroup, --debug. Errors go to stderr and, with
--log, to FILE as one line each (json: {"level":"error","msg":"...","time":"..."}), which is
where containerd reads them.

Exit status: 0 done; 1 the runtime failed (one line says why); 2 a usage error; run: the
command's status (128+N when signal N killed it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .. import __version__
from ..errors import NsRuntimeError
from ..lean import dumps
from ..signals import signal_number
from . import runtime
from .spec import SPEC_VERSION

EXIT_FAILED = 1
EXIT_USAGE = 2


class _Log:
    """Where errors (and with --debug, what is done) are written: stderr, and --log FILE."""

    def __init__(self, path: str | None, fmt: str, debug: bool) -> None:
        self.path = path
        self.fmt = fmt
        self.debug_on = debug

    def _line(self, level: str, msg: str) -> str:
        t = time.time()
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"
        if self.fmt == "json":
            return dumps({"level": level, "msg": msg, "time": now})
        return f"time={dumps(now)} level={level} msg={dumps(msg)}"

    def _write(self, level: str, msg: str) -> None:
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            sys.stderr.write(f"nsrun: --log {self.path}: {(e.strerror or str(e)).lower()}\n")
            return
        try:
            os.write(fd, (self._line(level, msg) + "\n").encode(errors="replace"))
        finally:
            os.close(fd)

    def error(self, msg: str) -> None:
        sys.stderr.write(f"nsrun: {msg}\n")
        self._write("error", msg)

    def warning(self, msg: str) -> None:
        """What failed without failing the verb (a poststart or poststop hook)."""
        sys.stderr.write(f"nsrun: warning: {msg}\n")
        self._write("warning", msg)

    def debug(self, msg: str) -> None:
        if self.debug_on:
            self._write("debug", msg)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"nsrun: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nsrun", description="An OCI runtime (runc's command line) over nsruntime.")
    p.add_argument("--version", "-v", action="store_true", help="print the version and the runtime-spec version")
    p.add_argument("--root", default=runtime.DEFAULT_ROOT, help="the containers' state (default %(default)s)")
    p.add_argument("--log", help="also write errors to this file")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--systemd-cgroup", action="store_true",
                   help="accepted; cgroups are still made with cgroupfs (a slice:prefix:name path is read as "
                        "slice/prefix-name)")
    p.add_argument("--debug", action="store_true", help="also log what is done")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help)

    for name in ("create", "run"):
        v = verb(name, "make a container (run: and start it, wait for it, delete it)")
        v.add_argument("--bundle", "-b", default=".", help="the bundle directory (config.json), default: cwd")
        v.add_argument("--pid-file", help="write PID 1's host pid there (atomically)")
        v.add_argument("--console-socket", help="a unix socket the caller listens on: process.terminal's pty master "
                                                "goes there (SCM_RIGHTS)")
        v.add_argument("--no-pivot", action="store_true", help="switch root with MS_MOVE + chroot")
        v.add_argument("--no-new-keyring", action="store_true", help="accepted: nsrun never makes a session keyring")
        v.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                       help="pass our fds 3..3+N-1 on to the command")
        if name == "run":
            v.add_argument("--detach", "-d", action="store_true",
                           help="exit once it runs; the caller (a subreaper) reaps PID 1")
        v.add_argument("id")
    verb("start", "run the command of a created container").add_argument("id")
    verb("state", "print the container's OCI state as JSON").add_argument("id")
    v = verb("kill", "signal the container (its PID 1, which forwards to the command)")
    v.add_argument("--all", "-a", action="store_true", help="every process of the container")
    v.add_argument("id")
    v.add_argument("signal", nargs="?", default="TERM", help="a name (TERM, SIGKILL) or a number; default TERM")
    v = verb("delete", "release what the container holds; already gone: nothing to do")
    v.add_argument("--force", "-f", action="store_true", help="kill a running container first")
    v.add_argument("id")
    v = verb("exec", "run one more process in a created or running container; its exit status")
    v.add_argument("--process", "-p", help="an OCI process JSON file (args, env, cwd, user, capabilities, ...)")
    v.add_argument("--detach", "-d", action="store_true", help="exit once it runs; the caller (a subreaper) reaps")
    v.add_argument("--pid-file", help="write its host pid there (atomically)")
    v.add_argument("--tty", "-t", action="store_true", help="give it a terminal (relayed from this stdin)")
    v.add_argument("--console-socket", help="with --detach --tty: the pty master goes to this unix socket")
    v.add_argument("--cwd", help="its working directory, in the container")
    v.add_argument("--env", "-e", action="append", default=[], metavar="K=V", help="add to its environment")
    v.add_argument("--user", "-u", metavar="UID[:GID]", help="its user (numbers)")
    v.add_argument("--preserve-fds", type=int, default=0, metavar="N", help="pass our fds 3..3+N-1 on to it")
    v.add_argument("--cap", "-c", action="append", default=[], metavar="CAP",
                   help="add a capability (bounding, effective, permitted; ambient with an inheritable set)")
    v.add_argument("--additional-gids", "-g", action="append", default=[], type=int, metavar="GID",
                   help="add a supplementary group")
    v.add_argument("--no-new-privs", action="store_true", help="set no_new_privs")
    v.add_argument("--apparmor", metavar="PROFILE", help="confine it (refused where AppArmor is absent)")
    v.add_argument("id")
    v.add_argument("args", nargs=argparse.REMAINDER, help="the command (instead of --process)")
    v = verb("ps", "the container's processes (json: an array of host pids)")
    v.add_argument("--format", "-f", choices=("table", "json"), default="table")
    v.add_argument("id")
    verb("pause", "freeze every process of the container").add_argument("id")
    verb("resume", "thaw a paused container").add_argument("id")
    v = verb("list", "list the containers")
    v.add_argument("--format", "-f", choices=("table", "json"), default="table")
    v.add_argument("--quiet", "-q", action="store_true", help="ids only")
    v = verb("update", "change the live container's cgroup limits")
    v.add_argument("--resources", "-r", metavar="F", help="an OCI LinuxResources JSON file, - for stdin")
    for flag, what in (("--memory", "memory limit (bytes, or with k, m, g)"),
                       ("--memory-swap", "memory + swap limit (bytes, or with k, m, g; -1: none)"),
                       ("--cpu-share", "cpu.shares"), ("--cpu-quota", "CFS quota (µs)"),
                       ("--cpu-period", "CFS period (µs)"),
                       ("--cpuset-cpus", "the cpus allowed (0-1,3)"), ("--pids-limit", "the most processes"),
                       ("--blkio-weight", "block io weight (10-1000)")):
        v.add_argument(flag, help=what)
    v.add_argument("id")
    v = verb("events", "the container's stats and oom events as JSON lines, until it is gone")
    v.add_argument("--stats", action="store_true", help="print one stats event and exit")
    v.add_argument("--interval", default="5s", help="between stats events (5s, 500ms, 1m; default 5s)")
    v.add_argument("id")
    verb("features", "print the runtime-spec features document")
    v = verb("spec", "write a default config.json (root: ./rootfs)")
    v.add_argument("--bundle", "-b", default=".")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.version:
        sys.stdout.write(f"nsrun version {__version__}\nspec: {SPEC_VERSION}\n")
        return 0
    if args.verb is None:
        parser().error("a verb is required")
    log = _Log(args.log, args.log_format, args.debug)
    os.umask(0o022)  # the container's files as OCI's default process.user.umask asks
    try:
        return _verb(args, log)
    except NsRuntimeError as e:
        log.error(str(e))
        return EXIT_FAILED
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        log.error(f"{where}{(e.strerror or str(e)).lower()}")
        return EXIT_FAILED


def _verb(args: argparse.Namespace, log: _Log) -> int:
    root = args.root
    log.debug(f"{args.verb} {getattr(args, 'id', '')}".strip())
    if args.verb in ("create", "run"):
        if args.no_pivot:
            raise NsRuntimeError("--no-pivot: not supported yet")
        if args.verb == "create":
            runtime.create(root, args.id, args.bundle, pid_file=args.pid_file, console_socket=args.console_socket,
                           preserve_fds=args.preserve_fds)
            return 0
        return runtime.run(root, args.id, args.bundle, pid_file=args.pid_file, detach=args.detach,
                           console_socket=args.console_socket, warn=log.warning, preserve_fds=args.preserve_fds)
    if args.verb == "start":
        for w in runtime.start(root, args.id):
            log.warning(w)
    elif args.verb == "state":
        sys.stdout.write(dumps(runtime.Record(root, args.id).state()) + "\n")
    elif args.verb == "kill":
        signum = signal_number(args.signal)
        if signum is None:
            raise NsRuntimeError(f"kill: unknown signal {args.signal!r}")
        runtime.kill(root, args.id, signum, all_processes=args.all)
    elif args.verb == "delete":
        for w in runtime.delete(root, args.id, force=args.force):
            log.warning(w)
    elif args.verb == "exec":
        return runtime.exec_(root, args.id, list(args.args), process_file=args.process, tty=args.tty,
                             cwd=args.cwd, env=list(args.env), user=args.user, detach=args.detach,
                             pid_file=args.pid_file, console_socket=args.console_socket,
                             preserve_fds=args.preserve_fds, caps=list(args.cap),
                             additional_gids=list(args.additional_gids), no_new_privs=args.no_new_privs,
                             apparmor=args.apparmor)
    elif args.verb == "ps":
        _ps(runtime.ps(root, args.id), args.format)
    elif args.verb == "pause":
        runtime.pause(root, args.id)
    elif args.verb == "resume":
        runtime.resume(root, args.id)
    elif args.verb == "list":
        _list(root, args.format, args.quiet)
    elif args.verb == "update":
        runtime.update(root, args.id, _update_resources(args), "resources" if args.resources else "update")
    elif args.verb == "events":
        runtime.events(root, args.id, stats_once=args.stats, interval=_duration(args.interval),
                       emit=_emit)
    elif args.verb == "features":
        sys.stdout.write(dumps(runtime.features()) + "\n")
    elif args.verb == "spec":
        runtime.spec_file(args.bundle)
    return 0


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
# flag -> (the resources object's path, reads its value)
_UPDATE_FLAGS = {
    "memory": (("memory", "limit"), "bytes"), "memory_swap": (("memory", "swap"), "bytes"),
    "cpu_share": (("cpu", "shares"), "int"), "cpu_quota": (("cpu", "quota"), "int"),
    "cpu_period": (("cpu", "period"), "int"), "cpuset_cpus": (("cpu", "cpus"), "str"),
    "pids_limit": (("pids", "limit"), "int"), "blkio_weight": (("blockIO", "weight"), "int"),
}


def _update_resources(args: argparse.Namespace) -> dict[str, object]:
    """--resources F (or -: stdin), with each flag given set on top (runc's way)."""
    from ..fields import decode_json

    res: dict[str, object] = {}
    if args.resources is not None:
        try:
            if args.resources == "-":
                raw = sys.stdin.buffer.read(1 << 20)
            else:
                with open(args.resources, "rb") as f:
                    raw = f.read(1 << 20)
        except OSError as e:
            raise NsRuntimeError(f"--resources {args.resources}: {(e.strerror or str(e)).lower()}") from None
        decoded = decode_json("--resources", raw, 1 << 20)
        if not isinstance(decoded, dict):
            raise NsRuntimeError("--resources: not a JSON object (OCI LinuxResources)")
        res = decoded
    for name, ((group, key), kind) in _UPDATE_FLAGS.items():
        text = getattr(args, name)
        if text is None:
            continue
        flag = "--" + name.replace("_", "-")
        value: object = text if kind == "str" else _number(flag, text, kind == "bytes")
        sub = res.setdefault(group, {})
        if not isinstance(sub, dict):
            raise NsRuntimeError(f"--resources: {group}: not a JSON object")
        sub[key] = value
    if not res:
        raise NsRuntimeError("update: --resources F or a limit flag (--memory, --pids-limit...) is required")
    return res


def _number(flag: str, text: str, sized: bool) -> int:
    """An integer flag's value; with sized, k, m or g (binary: 1k = 1024) may follow."""
    digits = text.rstrip("bBkKmMgG") if sized else text
    unit = text[len(digits):].lower()
    try:
        return int(digits) * _UNITS[unit]
    except (ValueError, KeyError):
        raise NsRuntimeError(f"{flag} {text!r}: not a number" + (" (k, m, g allowed)" if sized else "")) from None


def _emit(event: dict[str, object]) -> None:
    sys.stdout.write(dumps(event) + "\n")
    sys.stdout.flush()  # a reader (containerd's shim) acts on each line as it comes


def _duration(text: str) -> float:
    """5s, 500ms, 1m, 1.5 (seconds): runc's --interval."""
    number, scale = text, 1.0
    for suffix, unit in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], unit
            break
    try:
        seconds = float(number) * scale
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise NsRuntimeError(f"--interval {text!r}: not a positive duration (5s, 500ms, 1m)")
    return seconds


def _ps(pids: list[int], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(dumps(pids) + "\n")
        return
    sys.stdout.write("PID    CMD\n")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        sys.stdout.write(f"{pid:<6} {cmd}\n")


def _list(root: str, fmt: str, quiet: bool) -> None:
    states = []
    for cid in runtime.ids(root):
        try:
            states.append(runtime.Record(root, cid).state())
        except NsRuntimeError:
            continue  # removed meanwhile
    if quiet:
        sys.stdout.write("".join(f"{s['id']}\n" for s in states))
    elif fmt == "json":
        sys.stdout.write(dumps(states) + "\n")
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [(s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root")
                 for s in states]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
