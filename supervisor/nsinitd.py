"""The ``nsinitd`` command: its command line (supervisor.options), then supervisor.daemon's main
after starting the zygote early.

Importing the daemon (trio, structlog) takes a good part of nsinitd's start, and a config with
containers then waits for a zygote (a fresh interpreter importing nsruntime) before the first
one. Launched here, before those imports, the zygote boots meanwhile on another core. Only the
config's text is looked at: the daemon still reads and checks it as ever.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .options import Options, parse_args

if TYPE_CHECKING:
    from nsruntime import Zygote


def _early_zygote(opts: Options) -> Zygote | None:
    if opts.check:
        return None
    try:
        with open(opts.config, encoding="utf-8", errors="replace") as f:
            if "container" not in f.read(1 << 20):
                return None
        from nsruntime import Zygote

        return Zygote.launch()
    except (OSError, ImportError):
        return None  # the daemon reports a bad path; a zygote that can't start is started later, or not


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    zygote = _early_zygote(opts)
    try:
        from .daemon import run_main

        run_main(opts, zygote=zygote)
    finally:
        if zygote is not None:
            zygote.close()  # (the daemon has closed it already on a normal exit)


if __name__ == "__main__":
    main()
