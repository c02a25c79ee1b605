"""nsinitd's command line: one parser, shared by ``nsinitd`` (supervisor.nsinitd) and
``python -m supervisor.daemon``.

The plain spellings are read without argparse (8 ms to import, on every start); anything else
(help, version, an unknown option, a missing value) goes to argparse, which accepts exactly the
same options, so both paths agree. Imports nothing heavy: nsinitd reads its options before it
launches the zygote and before trio and structlog load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from . import __version__

LOG_FORMATS = ("text", "json")
DESCRIPTION = "nsinit process and container supervisor (foreground; events on stdout)"
EPILOG = ("signals: TERM/INT stop every program and exit, HUP reload the config, USR2 reopen logs. "
          "exit status: 0 ordered shutdown, 1 could not run (state_dir held by another nsinitd, "
          "a directory, the control socket), 2 bad config or usage.")


class Options(NamedTuple):  # not a dataclass: dataclasses imports inspect, ~12 ms before the zygote starts
    config: str
    no_socket: bool = False
    check: bool = False
    #: how events are written on stdout; None: text on a terminal, JSON lines otherwise
    log_format: str | None = None


def _fast(argv: Sequence[str]) -> Options | None:
    """Options when argv holds only plainly spelled options with valid values; else None."""
    config: str | None = None
    no_socket = check = False
    log_format: str | None = None
    it = iter(argv)
    for a in it:
        if a in ("-c", "--config"):
            config = next(it, None)
            if config is None or config.startswith("-"):
                return None
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif a.startswith("-c") and len(a) > 2 and not a.startswith("--"):
            config = a[2:]
        elif a == "--no-socket":
            no_socket = True
        elif a == "--check":
            check = True
        elif a == "--log-format" or a.startswith("--log-format="):
            log_format = a.split("=", 1)[1] if "=" in a else next(it, None)
            if log_format not in LOG_FORMATS:
                return None
        else:
            return None
    return Options(config, no_socket, check, log_format) if config else None


def parse_args(argv: Sequence[str]) -> Options:
    """nsinitd's options; help and version exit 0, a usage error exits 2 (usage on stderr)."""
    fast = _fast(argv)
    if fast is not None:
        return fast
    import argparse

    parser = argparse.ArgumentParser(prog="nsinitd", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False)
    parser.add_argument("-c", "--config", required=True, help="supervisor config file (TOML)")
    parser.add_argument("--no-socket", action="store_true", help="do not open the control socket")
    parser.add_argument("--check", action="store_true", help="validate the config (and each container.json) and exit")
    parser.add_argument("--log-format", choices=LOG_FORMATS,
                        help="events on stdout: text (default on a terminal) or json (default otherwise); "
                             "the event log file is always JSON")
    parser.add_argument("--version", action="version", version=f"nsinitd {__version__}")
    args = parser.parse_args(argv)
    return Options(args.config, args.no_socket, args.check, args.log_format)
