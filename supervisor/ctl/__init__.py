"""nsinitctl: control a running nsinitd over its unix socket, and read JSON event logs.

Usage: ``nsinitctl [-s SOCKET] [-c CONFIG] [--json] [--timeout S] COMMAND ...``

The socket is ``-s``, else ``[supervisor] socket`` of the config file given with ``-c``, else
``/run/nsinit/nsinitd.sock``. Commands: status, start, stop, restart, signal, exec, pid, logs, events,
top, reload, reread, shutdown, version (``nsinitctl COMMAND -h`` for each). Each answer is awaited
30 s for start/stop/restart/reload/shutdown, 10 s for the rest, or ``--timeout``.

Exit statuses:

====  ==========================================================================================
0     success
1     the action failed: a program did not reach the wanted state (start ended FATAL/BACKOFF,
      start of a running program, stop of a stopped one), reload failed, the daemon reported an
      internal error, an event stream was dropped for falling behind
2     usage error: bad arguments, unknown command, unknown program, unreadable config or file
3     a program is not running: ``status NAME...`` with a named program not RUNNING, ``pid NAME``,
      ``signal`` or ``exec`` on a program that isn't running
4     nsinitd unreachable: no socket, not a socket, nobody listening, connection lost, no answer
      within the timeout (--timeout, default 30 s or 10 s)
5     refused: the socket's permissions or the daemon's SO_PEERCRED check (not root, not in the
      configured group)
125   exec: the runtime failed to join the container (the command never ran)
N     exec: otherwise the exit status of the command run in the container (128+signal if killed)
130   interrupted (Ctrl-C) -- except while following (``logs -f``, ``events -f``, ``top``), where
      Ctrl-C is the normal way out and the status is 0
====  ==========================================================================================

With several programs the worst status wins (the highest number). The client never imports trio:
it speaks :mod:`supervisor.protocol` over a blocking socket, so it starts fast.

The package, in the order its modules depend on each other:

* :mod:`.errors`: the exit statuses above, and the exceptions that end a command with one;
* :mod:`.client`: which socket (``-s``, ``-c``), the blocking client, its timeouts;
* :mod:`.eventlog`: reading and following files (the event log, programs' output), choosing events;
* :mod:`.render`: the status and top tables, events as JSON lines or a table, ``--json``;
* :mod:`.commands`: one ``cmd_*`` function per command, and the argparse definitions;
* this module: :func:`run` (one command line, its exit status) and :func:`main` (the program).
"""

from __future__ import annotations

import contextlib
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import IO, NoReturn

__all__ = ["build_parser", "main", "run"]

# The modules below are imported when a command runs, not with the package: `nsinitctl status`
# (supervisor.ctl.fast) imports this package and must not pay for argparse, json, re, dataclasses.


def build_parser() -> argparse.ArgumentParser:
    """nsinitctl's argparse parser (supervisor.ctl.commands)."""
    from supervisor.ctl.commands import build_parser as build

    return build()


def run(argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run one nsinitctl command; returns its exit status."""
    from supervisor.ctl.commands import FOLLOWING
    from supervisor.ctl.errors import INTERRUPTED, OK, CtlError, RemoteError, status_for
    from supervisor.ctl.render import Output

    o = Output(out or sys.stdout, err or sys.stderr, json=False)
    try:
        args = build_parser().parse_args(argv)
        o.json = args.json
        try:
            return int(args.handler(args, o))
        except KeyboardInterrupt:
            return OK if args.command in FOLLOWING or args.follow else INTERRUPTED
    except CtlError as e:
        o.error(e.message)
        return e.status
    except RemoteError as e:
        o.error(e.message)
        return status_for(e.code)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    from supervisor.ctl.fast import status as fast_status

    try:
        # the console script's `status` first, without the full client's imports (ctl/fast.py)
        quick = fast_status(sys.argv[1:]) if argv is None else None
        status = run(argv) if quick is None else quick
    except BrokenPipeError:
        from supervisor.ctl.errors import OK

        # `nsinitctl events | head`: the reader left; that's not an error of ours.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        status = OK
    except KeyboardInterrupt:
        from supervisor.ctl.errors import INTERRUPTED

        status = INTERRUPTED
    sys.exit(status)
