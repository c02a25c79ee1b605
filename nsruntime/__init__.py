"""nsruntime: a Linux container runtime after libcontainer's nsinit.

Public API (everything else is private):

    cfg = load_config(path)                      # ConfigError names the field path
    c = create(cfg, rootfs, command, state_dir)  # PID 1 ready, root in place, command not yet running
    making = begin_create(...)                   # the same, driven by an event loop: making.fd, making.step()
    c.start(); c.signal(sig); c.kill(); c.poll(); c.wait(); c.destroy()
    join(state_dir, command)                     # run a command inside a live container

Where things live (each module opens with why): container.py (the record and its verbs),
creator.py (the host side of create), spawn.py (the child side: PID 1 and the command's process),
joiner.py (join), channel.py (what those processes say to each other), signals.py (exit statuses and
signal names), libc.py (every syscall), state.py (the records on the host).
"""

from __future__ import annotations

from .errors import ConfigError, NsRuntimeError, SetupError, StateError, SyscallError, TeardownError
from .signals import ExitStatus, signal_name, signal_number, status_to_code

#: The one version string of nsinit, nsinitd and nsinitctl (pyproject.toml reads it from here).
__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .cgroups.detect import Hierarchy
    from .cgroups.detect import detect as detect_cgroups
    from .config import ContainerConfig
    from .config import load as load_config
    from .container import Container, describe, exit_report, reattach
    from .creator import Creating, begin_create, cleanup_stale, create
    from .joiner import Joined, join, open_join
    from .lean import loads as json_loads
    from .lean import replace as replace_config
    from .libc import set_subreaper
    from .oci.spec import Spec as OciSpec
    from .oci.spec import load as load_oci_bundle
    from .state import StateDir, proc_state
    from .zygote import Zygote

# where each lazily loaded name lives (module, or module:name when exported under another name):
# `nsinit state` and config checks don't pay for the rest, and the supervisor's pure modules
# (machine, config) load no ctypes through this package
_LAZY = {
    "ContainerConfig": "config", "load_config": "config:load",
    "Container": "container", "describe": "container", "reattach": "container", "exit_report": "container",
    "Creating": "creator", "begin_create": "creator", "cleanup_stale": "creator", "create": "creator",
    "Joined": "joiner", "join": "joiner", "open_join": "joiner",
    "proc_state": "state", "StateDir": "state",
    "Zygote": "zygote", "set_subreaper": "libc",
    "Hierarchy": "cgroups.detect", "detect_cgroups": "cgroups.detect:detect",
    "OciSpec": "oci.spec:Spec", "load_oci_bundle": "oci.spec:load", "replace_config": "lean:replace",
    "json_loads": "lean:loads",
}  # fmt: skip


def __getattr__(name: str) -> object:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'nsruntime' has no attribute {name!r}")
    import sys

    module, _, attr = where.partition(":")
    __import__(f"{__name__}.{module}")
    return getattr(sys.modules[f"{__name__}.{module}"], attr or name)


__all__ = [
    "ConfigError",
    "Container",
    "ContainerConfig",
    "Creating",
    "ExitStatus",
    "Hierarchy",
    "Joined",
    "NsRuntimeError",
    "OciSpec",
    "SetupError",
    "StateDir",
    "StateError",
    "SyscallError",
    "TeardownError",
    "Zygote",
    "__version__",
    "begin_create",
    "cleanup_stale",
    "create",
    "describe",
    "detect_cgroups",
    "exit_report",
    "join",
    "json_loads",
    "load_config",
    "load_oci_bundle",
    "open_join",
    "proc_state",
    "reattach",
    "replace_config",
    "set_subreaper",
    "signal_name",
    "signal_number",
    "status_to_code",
]
