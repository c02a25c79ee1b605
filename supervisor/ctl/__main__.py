"""``python -m supervisor.ctl``: the same as bin/nsinitctl."""

from supervisor.ctl import main

main()
