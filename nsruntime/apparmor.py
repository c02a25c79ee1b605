"""AppArmor: confine the container's command with ``context.apparmor_profile``.

Two steps, in two processes. ``check(profile)`` runs on the host side before anything is made:
it refuses (SetupError) when AppArmor is not enabled, or when the profile is not loaded, since
running the command unconfined when a profile was asked for would be a silent security downgrade.
``apply(profile)`` runs in the container's process just before execve: it writes
``exec <profile>`` to the calling task's exec attribute, so the profile takes effect at the next
execve, never on the runtime's own code.

Paths are parameters so the write path is tested against a fake attribute file on machines
without AppArmor.
"""

from __future__ import annotations

import errno as _errno
import os

from .errors import SetupError

ENABLED_PATH = "/sys/module/apparmor/parameters/enabled"
PROFILES_PATH = "/sys/kernel/security/apparmor/profiles"
# the LSM-stacking interface first; /proc/self/attr/exec is shared with other LSMs (SELinux)
ATTR_PATHS = ("/proc/self/attr/apparmor/exec", "/proc/self/attr/exec")


def enabled(enabled_path: str = ENABLED_PATH) -> bool:
    try:
        with open(enabled_path) as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def _validate(profile: str) -> None:
    if not profile or profile != profile.strip() or any(c in profile for c in "\n\x00"):
        raise SetupError("apparmor", f"profile name {profile!r} is empty or holds whitespace at its ends, "
                         "a newline or a NUL")


def loaded(profiles_path: str = PROFILES_PATH) -> set[str] | None:
    """Names of the loaded profiles, or None when the list can't be read (securityfs not mounted)."""
    try:
        with open(profiles_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # "name (mode)"; a name may itself hold spaces
    return {line.rsplit(" (", 1)[0] for line in lines if line}


def check(profile: str, *, enabled_path: str = ENABLED_PATH, profiles_path: str = PROFILES_PATH) -> None:
    """Refuse, with one clear line, a profile this kernel can't apply. Never returns silently when
    the command would run unconfined."""
    _validate(profile)
    if not enabled(enabled_path):
        raise SetupError("apparmor", f'profile "{profile}" asked for, but AppArmor is not enabled on this kernel '
                         f"({enabled_path} is missing or not Y); refusing to run the command unconfined")
    names = loaded(profiles_path)
    if names is not None and profile not in names and profile != "unconfined":
        raise SetupError("apparmor", f'profile "{profile}" is not loaded ({profiles_path}); load it with '
                         "apparmor_parser first")


def attr_path() -> str:
    for p in ATTR_PATHS:
        if os.path.exists(p):
            return p
    raise SetupError("apparmor", f"none of {', '.join(ATTR_PATHS)} exists")


def apply(profile: str, *, path: str | None = None) -> None:
    """Have the next execve of the calling task enter ``profile`` (aa_change_onexec).

    One write(2) of ``exec <profile>``: the kernel parses the attribute per write call."""
    _validate(profile)
    target = path or attr_path()
    data = f"exec {profile}".encode()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            n = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        code = e.errno or 0
        raise SetupError("apparmor", f"write {data.decode()!r} to {target}: "
                         f"{_errno.errorcode.get(code, str(code))} ({os.strerror(code)})") from None
    if n != len(data):
        raise SetupError("apparmor", f"write {data.decode()!r} to {target}: short write ({n} of {len(data)} bytes)")
