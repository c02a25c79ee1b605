"""nsruntime: a Linux container runtime after libcontainer's nsinit.

Public API (everything else is private):

    cfg = load_config(path)                      # ConfigError names the field path
    c = create(cfg, rootfs, command, state_dir)  # PID 1 ready, root in place, command not yet running
    making = begin_create(...)                   # the same, driven by an event loop: making.fd, making.step()
    c.start(); c.signal(sig); c.kill(); c.poll(); c.wait(); c.destroy()
    join(state_dir, command)                     # run a command inside a live container
"""

from __future__ import annotations

from .config import ContainerConfig
from .config import load as load_config
from .errors import ConfigError, NsRuntimeError, SetupError, StateError, SyscallError, TeardownError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .container import (
        Container,
        Creating,
        ExitStatus,
        Joined,
        begin_create,
        cleanup_stale,
        create,
        describe,
        join,
        open_join,
    )

_LAZY = {"Container", "Creating", "ExitStatus", "Joined", "begin_create", "cleanup_stale", "create", "describe", "join",
         "open_join"}


def __getattr__(name: str) -> Any:
    # the container module is loaded on first use: `nsinit state` and config checks don't pay for it
    if name in _LAZY:
        from . import container

        return getattr(container, name)
    raise AttributeError(f"module 'nsruntime' has no attribute {name!r}")

__all__ = [
    "ConfigError",
    "Container",
    "ContainerConfig",
    "Creating",
    "ExitStatus",
    "Joined",
    "NsRuntimeError",
    "SetupError",
    "StateError",
    "SyscallError",
    "TeardownError",
    "begin_create",
    "cleanup_stale",
    "create",
    "describe",
    "join",
    "load_config",
    "open_join",
]
