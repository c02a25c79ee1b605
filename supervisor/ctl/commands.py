"""One function per nsinitctl command (``cmd_*``), and the command line that picks one.

A command function takes the parsed arguments and an :class:`~supervisor.ctl.render.Output`, and
returns the exit status or raises :class:`~supervisor.ctl.errors.CtlError`; it talks to the daemon
through :mod:`~supervisor.ctl.client` and prints through :mod:`~supervisor.ctl.render`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from supervisor import __version__
from supervisor.ctl.client import (
    ACTION_TIMEOUT,
    DEFAULT_SOCKET,
    QUICK_TIMEOUT,
    Client,
    answer_timeout,
    config_path,
    connect,
    listening,
    socket_path,
)
from supervisor.ctl.errors import (
    EXEC_FAILED,
    FAILED,
    NOT_RUNNING,
    OK,
    UNREACHABLE,
    USAGE,
    CtlError,
    RemoteError,
    status_for,
)
from supervisor.ctl.eventlog import EventFilter, Follower, parse_since, read_lines, tail_bytes
from supervisor.ctl.render import EventPrinter, Output, Sample, describe, status_lines, top_rows, top_table

# Where a program is on its way up or already up; "all" for stop means these.
ACTIVE_STATES = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})
# What "signal SIG all" signals: a program whose process is up and counted as started.
SIGNAL_PICKS = frozenset({"RUNNING"})


def cmd_status(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        programs: list[dict[str, Any]] = client.call("status")
    status = OK
    if args.names:
        by_name = {p["name"]: p for p in programs}
        unknown = [n for n in args.names if n not in by_name]
        programs = [by_name[n] for n in dict.fromkeys(args.names) if n in by_name]
        for name in unknown:
            o.error(f"{name}: ERROR (no such program)")
            status = USAGE
        if status == OK and any(p["state"] != "RUNNING" for p in programs):
            status = NOT_RUNNING
    if o.json:
        o.dump(programs)
    else:
        for line in status_lines(programs, time.time()):
            o.line(line)
    return status


def _expand_all(client: Client, names: Sequence[str], wanted: Callable[[dict[str, Any]], bool]) -> list[str]:
    if "all" not in names:
        return list(dict.fromkeys(names))
    return [p["name"] for p in client.call("status") if wanted(p)]


_ACTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    # command: (done word, the state that means done, the states "all" picks)
    "start": ("started", "RUNNING", frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF"})),
    "stop": ("stopped", "STOPPED", ACTIVE_STATES),
    "restart": ("restarted", "RUNNING", frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF", *ACTIVE_STATES})),
}


def cmd_action(args: argparse.Namespace, o: Output) -> int:
    word, wanted, picked = _ACTIONS[args.command]
    results: list[dict[str, Any]] = []
    status = OK
    with connect(args) as client:
        names = _expand_all(client, args.names, lambda p: p["state"] in picked)
        if args.command == "stop" and "all" in args.names:
            names.reverse()  # the daemon lists by name; stop in the opposite order of start
        for name in names:
            try:
                result = client.call(args.command, name=name)
            except RemoteError as e:
                status = max(status, status_for(e.code))
                results.append({"name": name, "error": {"code": e.code, "message": e.message}})
                if not o.json:
                    o.line(f"{name}: ERROR ({e.message})")
                continue
            results.append(result)
            reached = result["state"] == wanted or (args.command == "stop" and result["state"] not in ACTIVE_STATES)
            if not reached:
                status = max(status, FAILED)
            if not o.json:
                if reached:
                    o.line(f"{name}: {word}")
                else:
                    o.line(f"{name}: ERROR ({result['state']}: {describe(result, time.time()) or 'failed'})")
    if o.json:
        o.dump(results)
    return status


def parse_signal(text: str) -> int:
    """The signal of ``nsinitctl signal``: names and numbers as the runtime's one table reads them."""
    from nsruntime import signal_number

    number = signal_number(text)
    if number is None:
        raise CtlError(USAGE, f"no such signal: {text}")
    return number


def cmd_signal(args: argparse.Namespace, o: Output) -> int:
    from nsruntime import signal_name

    signum = parse_signal(args.signal)
    signame = signal_name(signum)
    results: list[dict[str, Any]] = []
    status = OK
    with connect(args) as client:
        for name in _expand_all(client, args.names, lambda p: p["state"] in SIGNAL_PICKS):
            try:
                client.call("signal", name=name, signum=signum)
            except RemoteError as e:
                status = max(status, status_for(e.code, not_running=NOT_RUNNING))
                results.append({"name": name, "error": {"code": e.code, "message": e.message}})
                if not o.json:
                    o.line(f"{name}: ERROR ({e.message})")
                continue
            results.append({"name": name, "signal": signame})
            if not o.json:
                o.line(f"{name}: signalled {signame}")
    if o.json:
        o.dump(results)
    return status


def cmd_exec(args: argparse.Namespace, o: Output) -> int:
    command: list[str] = args.cmd
    with connect(args) as client:
        try:
            state_dir = client.call("exec_target", name=args.name)
        except RemoteError as e:
            raise CtlError(status_for(e.code, not_running=NOT_RUNNING), e.message) from None
    from nsruntime import join  # only exec pays for the runtime

    try:
        return int(join(Path(state_dir), command, tty=args.tty))
    except Exception as e:
        # The runtime's errors name the step and the path; show them as they are.
        raise CtlError(EXEC_FAILED, f"exec {args.name}: {e}") from None


def cmd_pid(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            pid = client.call("pid", **({"name": args.name} if args.name else {}))
        except RemoteError as e:
            # Print no pid at all rather than 0: `kill $(nsinitctl pid web)` must not become `kill 0`.
            raise CtlError(status_for(e.code, not_running=NOT_RUNNING), e.message) from None
    if o.json:
        o.dump({"name": args.name, "pid": pid})
    else:
        o.line(str(pid))
    return OK


def cmd_logs(args: argparse.Namespace, o: Output) -> int:
    stream = "stderr" if args.stderr else "stdout"
    with connect(args) as client:
        try:
            path = Path(client.call("log_path", name=args.name, stream=stream))
        except RemoteError as e:
            raise CtlError(status_for(e.code), e.message) from None
    out = getattr(o.out, "buffer", None)

    def write(data: bytes) -> None:
        if out is not None:
            out.write(data)
            out.flush()
        else:
            o.out.write(data.decode(errors="replace"))
            o.out.flush()

    f: IO[bytes] | None
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the Follower
    except FileNotFoundError:
        if not args.follow:
            o.error(f"{args.name}: no {stream} captured yet ({path})")
            return OK
        f = None
    except OSError as e:
        raise CtlError(FAILED, f"cannot read {path}: {e.strerror}") from None
    if f is not None:
        write(tail_bytes(f, args.lines))
    if not args.follow:
        if f is not None:
            f.close()
        return OK
    follower = Follower(path, f)
    try:
        while True:
            data = follower.read()
            if data:
                write(data)
            else:
                follower.wait()
    finally:
        follower.close()


def _event_log(args: argparse.Namespace) -> str:
    """The event log to read: the config's ``event_log``, else the one the daemon names."""
    if args.config:
        path = config_path(args.config, "event_log")
        if path:
            return path
    try:
        with connect(args) as client:
            path = client.call("event_log")
    except (CtlError, RemoteError) as e:
        if isinstance(e, CtlError) and e.status != UNREACHABLE:
            raise
        raise CtlError(
            USAGE,
            f"events: nothing to read: no nsinitd answers at {socket_path(args)} to say where its event log is; "
            "use -f for the live stream, or --file PATH (or -c CONFIG with [supervisor] event_log)",
        ) from None
    if not isinstance(path, str):
        raise CtlError(
            USAGE,
            f"events: nsinitd at {socket_path(args)} keeps no event log ([supervisor] event_log): "
            "use -f for the live stream",
        )
    return path


def cmd_events(args: argparse.Namespace, o: Output) -> int:
    keep = EventFilter(
        programs=frozenset(args.program or ()),
        patterns=tuple(args.event or ()),
        since=parse_since(args.since) if args.since else None,
    )
    printer = EventPrinter(o, keep, args.pretty)
    path = args.file
    if path is None and not args.follow:
        path = _event_log(args)
    if path is None:
        with connect(args) as client:
            for event in client.stream("events"):
                printer.event(event)
        o.error(f"the event stream ended: {client.ended or 'nsinitd closed it'}")
        return OK
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the Follower
    except OSError as e:
        raise CtlError(USAGE, f"cannot read {path}: {e.strerror}") from None
    try:
        for raw in read_lines(Path(path), f, follow=args.follow):
            printer.line(raw)
        return OK
    finally:
        f.close()
        if printer.malformed:
            o.error(f"skipped {printer.malformed} malformed line(s) in {path}")


def cmd_top(args: argparse.Namespace, o: Output) -> int:
    interactive = o.out.isatty() and not o.json
    previous: Sample | None = None
    frames = 0
    with connect(args) as client:

        def sample() -> Sample:
            try:
                return Sample(time.monotonic(), client.call("stats"))
            except RemoteError as e:
                raise CtlError(FAILED, f"top: {e.message}") from None

        previous = sample()
        time.sleep(min(args.delay, 0.5))
        try:
            while args.iterations is None or frames < args.iterations:
                current = sample()
                rows = top_rows(previous, current)
                previous = current
                frames += 1
                if o.json:
                    o.line(json.dumps({"ts": time.time(), "programs": rows}))
                elif interactive:
                    # Home, rewrite each line clearing its tail, clear below: no flicker, no scroll.
                    body = "".join(f"{line}\x1b[K\n" for line in top_table(rows))
                    o.out.write("\x1b[?25l\x1b[H" + body + "\x1b[J")
                    o.out.flush()
                else:
                    if frames > 1:
                        o.line()
                    for line in top_table(rows):
                        o.line(line)
                if args.iterations is None or frames < args.iterations:
                    time.sleep(args.delay)
        finally:
            if interactive:
                o.out.write("\x1b[?25h")
                o.out.flush()
    return OK


def cmd_reload(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            changes = client.call("reload")
        except RemoteError as e:
            raise CtlError(status_for(e.code), f"reload: {e.message}") from None
    if o.json:
        o.dump(changes)
        return OK
    said = False
    for key in ("added", "changed", "removed"):
        for name in changes.get(key, ()):
            o.line(f"{name}: {key}")
            said = True
    if not said:
        o.line("no changes")
    return OK


def cmd_reread(args: argparse.Namespace, o: Output) -> int:
    with connect(args) as client:
        try:
            changes = client.call("reread")
        except RemoteError as e:
            raise CtlError(status_for(e.code), f"reread: {e.message}") from None
    if o.json:
        o.dump(changes)
        return OK
    lines = [
        f"{name}: {word}"
        for key, word in (("added", "available"), ("changed", "changed"), ("removed", "disappeared"))
        for name in changes.get(key, ())
    ]
    for line in lines or ["no config updates to programs"]:
        o.line(line)
    return OK


def cmd_shutdown(args: argparse.Namespace, o: Output) -> int:
    path = socket_path(args)
    timeout = answer_timeout(args)
    with Client(path, timeout) as client:
        try:
            result = client.call("shutdown")
        except RemoteError as e:
            raise CtlError(status_for(e.code), f"shutdown: {e.message}") from None
    pid = result.get("pid") if isinstance(result, dict) else None
    if args.wait:
        deadline = time.monotonic() + timeout
        while os.path.exists(path) and listening(path):
            if time.monotonic() > deadline:
                raise CtlError(FAILED, f"nsinitd (pid {pid}) still running after {timeout:g} s")
            time.sleep(0.1)
    if o.json:
        o.dump({"pid": pid, "stopped": bool(args.wait)})
    else:
        o.line(f"nsinitd (pid {pid}) {'shut down' if args.wait else 'is shutting down'}")
    return OK


def cmd_version(args: argparse.Namespace, o: Output) -> int:
    try:
        with connect(args) as client:
            daemon = client.call("version")
    except CtlError as e:
        if o.json:
            o.dump({"nsinitctl": __version__, "nsinitd": None})
        else:
            o.line(f"nsinitctl {__version__}")
        raise e from None
    if o.json:
        o.dump({"nsinitctl": __version__, "nsinitd": daemon})
    else:
        o.line(f"nsinitctl {__version__}")
        o.line(f"nsinitd {daemon.get('version')} (pid {daemon.get('pid')}, protocol {daemon.get('protocol')})")
    return OK


# -- command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's shape (usage, then "PROG: error: ..."), always under one name, and exit 2
        # through run() like every other usage error
        self.print_usage(sys.stderr)
        raise CtlError(USAGE, f"error: {message}")


def _at_least(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return whole_number


class _ExecCommand(argparse.Action):
    """exec's command: everything after ``--``. Anything else after NAME that looks like an option
    is a mistake (``exec web -t -- sh`` would run ``-t``), refused rather than run."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        command = list(values)
        if command[:1] == ["--"]:
            command = command[1:]
        elif command and command[0].startswith("-"):
            parser.error(f"exec: options go before NAME, the command after --: {command[0]!r}")
        if not command:
            parser.error("exec: no command given (nsinitctl exec NAME -- CMD...)")
        setattr(namespace, self.dest, command)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    # The global options work before or after the command: the subparsers share them with
    # SUPPRESS defaults, so a subparser never overwrites what was given before the command.
    def common() -> _Parser:
        # A fresh parser each time: parents share their action objects, and set_defaults on the
        # main parser would otherwise turn the subparsers' SUPPRESS defaults into None too.
        p = _Parser(add_help=False)
        p.add_argument("-s", "--socket", default=argparse.SUPPRESS, help=f"control socket (default {DEFAULT_SOCKET})")
        p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="nsinitd config: its [supervisor] socket")
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        p.add_argument(
            "--timeout",
            type=_positive,
            default=argparse.SUPPRESS,
            metavar="S",
            help=f"seconds to wait for an answer from nsinitd (default {ACTION_TIMEOUT:g} for start, stop, restart, "
            f"reload, shutdown; {QUICK_TIMEOUT:g} for the rest; a following -f waits without limit after the "
            "first answer)",
        )
        return p

    parser = _Parser(
        prog="nsinitctl",
        description="Control nsinitd.",
        parents=[common()],
        epilog="Exit statuses: 0 ok, 1 failed (also: start of a running program, stop of a stopped one), "
        "2 usage/unknown program, 3 not running, 4 nsinitd unreachable or no answer in time, 5 refused; "
        "exec: the command's own.",
    )
    parser.set_defaults(socket=None, config=None, json=False, timeout=None, follow=False)
    parser.add_argument("--version", action="version", version=f"nsinitctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, handler: Callable[[argparse.Namespace, Output], int], text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common()], help=text, description=text)
        p.set_defaults(handler=handler)
        return p

    p = add("status", cmd_status, "one line per program (exit 3 if a named program is not RUNNING)")
    p.add_argument("names", nargs="*", metavar="NAME")
    for name, text in (
        ("start", "start programs and wait until RUNNING"),
        ("stop", "stop programs and wait until STOPPED"),
        ("restart", "stop, then start programs"),
    ):
        p = add(name, cmd_action, text)
        p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p = add("signal", cmd_signal, "send a signal (name or number) to programs")
    p.add_argument("signal", metavar="SIG")
    p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p = add("exec", cmd_exec, "run a command inside a program's live container")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, action=_ExecCommand, metavar="-- CMD...")
    p = add("pid", cmd_pid, "the pid of nsinitd, or of a program")
    p.add_argument("name", nargs="?", metavar="NAME")
    p = add("logs", cmd_logs, "a program's captured output")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p.add_argument("-n", "--lines", type=_at_least(0), default=10, metavar="N", help="last N lines (default 10)")
    p.add_argument("--stderr", action="store_true", help="the stderr capture instead of stdout")
    p.add_argument("name", metavar="NAME")
    p = add("events", cmd_events, "lifecycle events: live from nsinitd, or from an event log file")
    p.add_argument("-f", "--follow", action="store_true", help="follow: live from nsinitd, or tail the --file")
    p.add_argument("--program", action="append", metavar="NAME", help="only this program (repeatable)")
    p.add_argument("--event", action="append", metavar="PATTERN", help="only events matching (fnmatch, repeatable)")
    p.add_argument("--since", metavar="TIME", help="RFC 3339 time, or relative: 30s, 10m, 2h, 1d")
    p.add_argument("--file", metavar="PATH", help="read this JSON-lines event log (no nsinitd needed)")
    p.add_argument("--pretty", action="store_true", help="a human-readable table instead of JSON lines")
    p = add("top", cmd_top, "live cpu, memory, pids and restarts of every program")
    p.add_argument("-d", "--delay", type=_positive, default=2.0, metavar="S", help="seconds between refreshes")
    p.add_argument("-n", "--iterations", type=_at_least(1), default=None, metavar="N", help="stop after N refreshes")
    add("reload", cmd_reload, "reread the config and apply additions, removals and changes")
    add("reread", cmd_reread, "what a reload would change (available, changed, disappeared), changing nothing")
    p = add("shutdown", cmd_shutdown, "stop every program and nsinitd")
    p.add_argument("--wait", action="store_true", help="wait until nsinitd has exited")
    add("version", cmd_version, "versions of nsinitctl and nsinitd")
    return parser


# Commands that run until Ctrl-C, besides those given -f: for them Ctrl-C is the normal way out (exit 0).
FOLLOWING = frozenset({"top"})
