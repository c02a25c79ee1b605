"""nsruntime: a Linux container runtime after libcontainer's nsinit.

Public API (everything else is private):

    cfg = load_config(path)                      # ConfigError names the field path
    c = create(cfg, rootfs, command, state_dir)  # PID 1 ready, root in place, command not yet running
    c.start(); c.signal(sig); c.kill(); c.poll(); c.wait(); c.destroy()
    join(state_dir, command)                     # run a command inside a live container
"""

from .config import ContainerConfig
from .config import load as load_config
from .container import Container, ExitStatus, Joined, cleanup_stale, create, describe, join, open_join
from .errors import ConfigError, NsRuntimeError, SetupError, StateError, SyscallError, TeardownError

__all__ = [
    "ConfigError",
    "Container",
    "ContainerConfig",
    "ExitStatus",
    "Joined",
    "NsRuntimeError",
    "SetupError",
    "StateError",
    "SyscallError",
    "TeardownError",
    "cleanup_stale",
    "create",
    "describe",
    "join",
    "load_config",
    "open_join",
]
