"""The ``nsinitd`` command: supervisor.daemon's main, after starting the zygote early.

Importing the daemon (trio, structlog) takes a good part of nsinitd's start, and a config with
containers then waits for a zygote (a fresh interpreter importing nsruntime) before the first
one. Launched here, before those imports, the zygote boots meanwhile on another core. Only the
config's text is looked at: the daemon still reads and checks it as ever.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def _config_path(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a.startswith("-c") and len(a) > 2:
            return a[2:]
    return None


def _early_zygote(argv: Sequence[str]) -> Any:
    if "--check" in argv or "-h" in argv or "--help" in argv:
        return None
    path = _config_path(argv)
    try:
        with open(path or "", encoding="utf-8", errors="replace") as f:
            if "container" not in f.read(1 << 20):
                return None
        from nsruntime.zygote import Zygote

        return Zygote.launch()
    except (OSError, ImportError):
        return None  # the daemon reports a bad path; a zygote that can't start is started later, or not


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    zygote = _early_zygote(args)
    try:
        from .daemon import main as daemon_main

        daemon_main(args, zygote=zygote)
    finally:
        if zygote is not None:
            zygote.close()  # (the daemon has closed it already on a normal exit)


if __name__ == "__main__":
    main()
