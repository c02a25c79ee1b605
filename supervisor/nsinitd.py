"""The ``nsinitd`` command: its command line (supervisor.options), then supervisor.daemon's main.

(An earlier nsinitd launched the zygote here, before importing trio, so that both booted side by
side. Container PID 1s must now be the keeper's children, to outlive nsinitd, so the zygote is
the keeper's child, started once nsinitd has found or started the keeper of its state_dir.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .options import parse_args


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    from .daemon import run_main

    run_main(opts)


if __name__ == "__main__":
    main()
