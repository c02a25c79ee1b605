"""``supervisor.toml`` -> frozen dataclasses, validated before anything starts.

Every error names its table and key, e.g. ``programs.web.autorestart: expected one of always,
on-failure, never``, and nsinitd exits with status 2 without starting anything. Unknown keys are
errors too (a typo must not silently fall back to a default).

Relative paths (``container``, ``socket``, ``event_log``, ``log_dir``, ``state_dir``) are taken
relative to the directory of the config file, so a config and its containers can move together.

The converters of user-written values live here, one per value type; ``parse_signal`` is also
nsinitctl's (``nsinitctl signal``): this module loads neither trio nor structlog, and whatever
names a signal in the config names it on the command line too.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import signal as _signal
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nsruntime import ConfigError as ContainerConfigError
from nsruntime import load_config as load_container_config
from nsruntime import signal_number

from .machine import AutoRestart, Policy

if TYPE_CHECKING:
    from nsruntime import OciSpec

AUTORESTART_CHOICES: tuple[AutoRestart, ...] = ("always", "on-failure", "never")
WebAuth = Literal["token", "none"]
OnExit = Literal["stop", "keep"]
WEB_AUTH_CHOICES: tuple[WebAuth, ...] = ("token", "none")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}

DEFAULT_SOCKET = "/run/nsinit/nsinitd.sock"
DEFAULT_LOG_DIR = "/var/log/nsinit"
DEFAULT_STATE_DIR = "/run/nsinit"
#: sun_path is 108 bytes, one of them the terminating NUL
MAX_SOCKET_PATH = 107


class ConfigError(Exception):
    """A bad config; ``str()`` is one line naming the key: ``programs.web.startsecs: ...``."""

    def __init__(self, key: str, message: str) -> None:
        key, message = _printable(key), _printable(message)
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


def _printable(s: str) -> str:
    """Keys and values come from the file: escape control characters so errors stay one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    max: float = 60.0


@dataclass(frozen=True)
class ProgramConfig:
    name: str
    command: tuple[str, ...]
    container: Path | None = None
    bundle: Path | None = None  # an OCI bundle (config.json and its root) instead of a container.json directory
    environment: tuple[tuple[str, str], ...] = ()
    autostart: bool = True
    autorestart: AutoRestart = "on-failure"
    exitcodes: frozenset[int] = frozenset({0})
    startsecs: float = 1.0
    startretries: int = 3
    backoff: Backoff = Backoff()  # immutable: one default for all
    stopsignal: int = int(_signal.SIGTERM)
    stopwaitsecs: float = 10.0
    priority: int = 999
    stdout_maxbytes: int = 50 * 1024 * 1024
    stdout_backups: int = 10
    redirect_stderr: bool = False

    @property
    def policy(self) -> Policy:
        return Policy(
            autorestart=self.autorestart,
            startretries=self.startretries,
            backoff_initial=self.backoff.initial,
            backoff_factor=self.backoff.factor,
            backoff_max=self.backoff.max,
        )

    @property
    def env(self) -> dict[str, str]:
        return dict(self.environment)


@dataclass(frozen=True)
class SupervisorConfig:
    socket: Path
    log_dir: Path
    state_dir: Path
    event_log: Path | None = None
    socket_group: int | None = None
    #: what SIGTERM and SIGINT do to the programs: "stop" them, or "keep" them running (under the
    #: keeper) for the next nsinitd to adopt
    on_exit: OnExit = "stop"


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the status page and /metrics (supervisor.web). ``listen`` is either a TCP
    address (``host``, ``port``; host an IP literal) or a unix socket path (``path``)."""

    listen: str  # as written, for messages
    host: str | None = None
    port: int | None = None
    path: Path | None = None
    auth: WebAuth = "token"
    token_file: Path | None = None
    max_connections: int = 512  # open connections at once; more are answered 503 and closed

    @property
    def loopback(self) -> bool:
        return self.path is not None or (self.host is not None and ipaddress.ip_address(self.host).is_loopback)


@dataclass(frozen=True)
class Config:
    path: Path
    supervisor: SupervisorConfig
    programs: Mapping[str, ProgramConfig]
    web: WebConfig | None = None

    def by_priority(self) -> list[ProgramConfig]:
        return sorted(self.programs.values(), key=lambda p: (p.priority, p.name))


# -- value checkers: each takes the dotted key for its error message -----------------------------


def _type_name(v: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _bool(key: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(key, f"expected true or false, got {_type_name(v)}")
    return v


def _int(key: str, v: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"expected an integer, got {_type_name(v)}")
    if lo is not None and v < lo:
        raise ConfigError(key, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(key, f"must be <= {hi}, got {v}")
    return v


def _number(key: str, v: object, lo: float = 0.0, hi: float = 10.0**9, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(key, f"expected a number, got {_type_name(v)}")
    f = float(v)
    if f != f or f < lo or (lo_open and f == lo) or f > hi:
        op = ">" if lo_open else ">="
        raise ConfigError(key, f"must be a number {op} {lo:g} and <= {hi:g}, got {v!r}")
    return f


def _str(key: str, v: object, nonempty: bool = True) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"expected a string, got {_type_name(v)}")
    if nonempty and not v:
        raise ConfigError(key, "must not be empty")
    if "\x00" in v:
        raise ConfigError(key, "must not contain NUL")
    return v


def _path(key: str, v: object, base: Path) -> Path:
    p = Path(_str(key, v))
    return p if p.is_absolute() else base / p


def _table(key: str, v: object) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(key, f"expected a table, got {_type_name(v)}")
    return v


def _no_unknown(key: str, table: Mapping[str, Any], known: set[str]) -> None:
    for k in table:
        if k not in known:
            prefix = f"{key}." if key else ""
            raise ConfigError(f"{prefix}{k}", f"unknown key (expected one of {', '.join(sorted(known))})")


def parse_signal(key: str, v: object) -> int:
    """``"TERM"``, ``"SIGTERM"``, ``"term"``, ``"15"`` or ``15`` -> 15; ConfigError(key, ...) for
    what names no signal of this system. The names and numbers are the runtime's (nsruntime's
    signal table), so a real-time signal by number is one too."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v in _signal.valid_signals():
            return v
        raise ConfigError(key, f"not a signal number: {v}")
    number = signal_number(_str(key, v))
    if number is None:
        raise ConfigError(key, f"unknown signal {v!r}")
    return number


def _size(key: str, v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return _int(key, v, 0)
    if isinstance(v, str):
        m = _SIZE_RE.match(v)
        if m:
            unit = m.group(2).upper() if m.group(2) else None
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ConfigError(key, f"expected a size in bytes (integer, or a string like \"10MB\"), got {v!r}")


def _group(key: str, v: object) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return _int(key, v, 0, 2**32 - 2)
    name = _str(key, v)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(key, f"no such group {name!r}") from None


# -- tables ---------------------------------------------------------------------------------------

_SUPERVISOR_KEYS = {"socket", "event_log", "log_dir", "state_dir", "socket_group", "on_exit"}
_PROGRAM_KEYS = {
    "container", "bundle", "command", "environment", "autostart", "autorestart", "exitcodes", "startsecs",
    "startretries", "backoff", "stopsignal", "stopwaitsecs", "priority", "stdout_maxbytes",
    "stdout_backups", "redirect_stderr",
}
_BACKOFF_KEYS = {"initial", "factor", "max"}
_WEB_KEYS = {"listen", "auth", "token_file", "max_connections"}


def _socket(key: str, v: object, base: Path) -> Path:
    p = _path(key, v, base)
    size = len(os.fsencode(p))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(key, f"{p} is {size} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH}")
    return p


def _supervisor(t: Mapping[str, Any], base: Path) -> SupervisorConfig:
    k = "supervisor"
    _no_unknown(k, t, _SUPERVISOR_KEYS)
    return SupervisorConfig(
        socket=_socket(f"{k}.socket", t.get("socket", DEFAULT_SOCKET), base),
        log_dir=_path(f"{k}.log_dir", t.get("log_dir", DEFAULT_LOG_DIR), base),
        state_dir=_path(f"{k}.state_dir", t.get("state_dir", DEFAULT_STATE_DIR), base),
        event_log=_path(f"{k}.event_log", t["event_log"], base) if "event_log" in t else None,
        socket_group=_group(f"{k}.socket_group", t["socket_group"]) if "socket_group" in t else None,
        on_exit=_on_exit(f"{k}.on_exit", t.get("on_exit", "stop")),
    )


def _on_exit(key: str, v: object) -> OnExit:
    if v == "stop":
        return "stop"
    if v == "keep":
        return "keep"
    raise ConfigError(key, "expected one of stop, keep")


def _listen(key: str, v: object, base: Path) -> tuple[str | None, int | None, Path | None]:
    """``"127.0.0.1:9001"``, ``"[::1]:9001"`` -> (host, port, None); a value with a ``/`` is a
    unix socket path -> (None, None, path). A host name is refused: what it resolves to can change."""
    text = _str(key, v)
    if "/" in text:
        return None, None, _socket(key, text, base)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(key, f'expected "HOST:PORT" or a unix socket path, got {text!r}')
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address (127.0.0.1, [::1], or one of this host's)") from None
    if isinstance(ip, ipaddress.IPv6Address) and not text.startswith("["):
        raise ConfigError(key, f"write an IPv6 address in brackets: [{host}]:{port_text}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(key, f"port must be 1-65535, got {port}")
    return str(ip), port, None


def check_token_file(key: str, path: Path) -> str:
    """The token in ``path``: a regular file owned by root (or nsinitd's user), readable by its
    owner alone, holding one non-empty line. ConfigError(key, ...) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise ConfigError(key, f"{path}: cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"{path}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(key, f"{path}: owned by uid {st.st_uid}; it must be root's")
        if st.st_mode & 0o077:
            raise ConfigError(key, f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others read it; "
                                   "chmod 600 it")
        data = f.read(4097)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: the token must be printable ASCII") from None
    if not token:
        raise ConfigError(key, f"{path}: empty; put a random token in it (e.g. openssl rand -hex 32)")
    if len(data) > 4096 or not token.isprintable() or any(ch.isspace() for ch in token):
        raise ConfigError(key, f"{path}: the token must be one line of at most 4096 printable characters")
    return token


def _web(t: Mapping[str, Any], base: Path) -> WebConfig:
    k = "web"
    _no_unknown(k, t, _WEB_KEYS)
    if "listen" not in t:
        raise ConfigError(f"{k}.listen", 'missing (e.g. "127.0.0.1:9001", or a unix socket path)')
    host, port, path = _listen(f"{k}.listen", t["listen"], base)
    auth = t.get("auth", "token")
    if auth not in WEB_AUTH_CHOICES:
        raise ConfigError(f"{k}.auth", f"expected one of {', '.join(WEB_AUTH_CHOICES)}")
    token_file: Path | None = None
    if auth == "token":
        if "token_file" not in t:
            raise ConfigError(f"{k}.token_file", 'missing (auth = "token" reads the token from this file)')
        token_file = _path(f"{k}.token_file", t["token_file"], base)
        check_token_file(f"{k}.token_file", token_file)
    elif "token_file" in t:
        raise ConfigError(f"{k}.token_file", 'only with auth = "token"')
    max_connections = _int(f"{k}.max_connections", t.get("max_connections", 512), 1, 65536)
    web = WebConfig(listen=t["listen"], host=host, port=port, path=path, auth=auth, token_file=token_file,
                    max_connections=max_connections)
    if auth == "none" and not web.loopback:
        raise ConfigError(f"{k}.auth", f'"none" is allowed only on 127.0.0.1, ::1 or a unix socket, not {host}')
    return web


def _program(name: str, t: Mapping[str, Any], base: Path) -> ProgramConfig:
    k = f"programs.{name}"
    _no_unknown(k, t, _PROGRAM_KEYS)
    container: Path | None = None
    if "container" in t:
        container = _path(f"{k}.container", t["container"], base)
        if not (container / "container.json").is_file():
            raise ConfigError(f"{k}.container", f"{container}: no container.json there")
    bundle: Path | None = None
    bundle_args: tuple[str, ...] = ()
    if "bundle" in t:
        if container is not None:
            raise ConfigError(f"{k}.bundle", "a program runs a container or a bundle, not both")
        bundle = _path(f"{k}.bundle", t["bundle"], base)
        bundle_args = load_bundle(f"{k}.bundle", bundle).args

    if "command" not in t and bundle is not None:
        command = bundle_args  # the bundle's own process.args
    elif "command" not in t:
        raise ConfigError(f"{k}.command", "missing (an array of strings: the program and its arguments)")
    else:
        cmd = t["command"]
        if not isinstance(cmd, list) or not cmd:
            raise ConfigError(f"{k}.command", "expected a non-empty array of strings")
        command = tuple(_str(f"{k}.command[{i}]", a, nonempty=(i == 0)) for i, a in enumerate(cmd))

    env: list[tuple[str, str]] = []
    for ek, ev in _table(f"{k}.environment", t.get("environment", {})).items():
        if not ek or "=" in ek or "\x00" in ek:
            raise ConfigError(f"{k}.environment.{ek}", "not a valid environment variable name")
        env.append((ek, _str(f"{k}.environment.{ek}", ev, nonempty=False)))

    autorestart = t.get("autorestart", "on-failure")
    if autorestart not in AUTORESTART_CHOICES:
        raise ConfigError(f"{k}.autorestart", f"expected one of {', '.join(AUTORESTART_CHOICES)}")

    codes = t.get("exitcodes", [0])
    if not isinstance(codes, list):
        raise ConfigError(f"{k}.exitcodes", f"expected an array of integers, got {_type_name(codes)}")
    exitcodes = frozenset(_int(f"{k}.exitcodes[{i}]", c, 0, 255) for i, c in enumerate(codes))

    b = _table(f"{k}.backoff", t.get("backoff", {}))
    _no_unknown(f"{k}.backoff", b, _BACKOFF_KEYS)
    backoff = Backoff(
        initial=_number(f"{k}.backoff.initial", b.get("initial", 1.0), 0.0, 86400.0),
        factor=_number(f"{k}.backoff.factor", b.get("factor", 2.0), 1.0, 100.0),
        max=_number(f"{k}.backoff.max", b.get("max", 60.0), 0.0, 86400.0),
    )
    if backoff.max < backoff.initial:
        raise ConfigError(f"{k}.backoff.max", f"must be >= initial ({backoff.initial:g})")

    return ProgramConfig(
        name=name,
        command=command,
        container=container,
        bundle=bundle,
        environment=tuple(env),
        autostart=_bool(f"{k}.autostart", t.get("autostart", True)),
        autorestart=autorestart,
        exitcodes=exitcodes,
        startsecs=_number(f"{k}.startsecs", t.get("startsecs", 1.0), 0.0, 3600.0),
        startretries=_int(f"{k}.startretries", t.get("startretries", 3), 0, 10**6),
        backoff=backoff,
        stopsignal=parse_signal(f"{k}.stopsignal", t.get("stopsignal", "TERM")),
        stopwaitsecs=_number(f"{k}.stopwaitsecs", t.get("stopwaitsecs", 10.0), 0.0, 86400.0),
        priority=_int(f"{k}.priority", t.get("priority", 999), -(10**9), 10**9),
        stdout_maxbytes=_size(f"{k}.stdout_maxbytes", t.get("stdout_maxbytes", 50 * 1024 * 1024)),
        stdout_backups=_int(f"{k}.stdout_backups", t.get("stdout_backups", 10), 0, 1000),
        redirect_stderr=_bool(f"{k}.redirect_stderr", t.get("redirect_stderr", False)),
    )


def parse(data: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-decoded TOML document; ``path`` anchors relative paths."""
    base = path.parent
    _no_unknown("", data, {"supervisor", "programs", "web"})
    sup = _supervisor(_table("supervisor", data.get("supervisor", {})), base)
    web = _web(_table("web", data["web"]), base) if "web" in data else None
    progs: dict[str, ProgramConfig] = {}
    for name, t in _table("programs", data.get("programs", {})).items():
        if not NAME_RE.match(name):
            raise ConfigError(f"programs.{name}",
                              "program names are 1-64 of A-Z a-z 0-9 _ . - (not starting with . or -)")
        progs[name] = _program(name, _table(f"programs.{name}", t), base)
    _check_containers(sup, progs)
    return Config(path=path, supervisor=sup, programs=progs, web=web)


def load_bundle(key: str, bundle: Path) -> OciSpec:
    """The OCI bundle's spec, as nsinitd can run it; ConfigError naming key and the file's field.

    nsinitd gives a program no terminal (it captures its output) and runs no OCI hooks (nsrun's
    lifecycle does): a bundle asking for either is refused rather than run without."""
    from nsruntime import load_oci_bundle

    if not (bundle / "config.json").is_file():
        raise ConfigError(key, f"{bundle}: no config.json there")
    try:
        sp = load_oci_bundle(str(bundle))
    except ContainerConfigError as e:
        raise ConfigError(key, f"{bundle / 'config.json'}: {e}" if e.path != str(bundle / "config.json")
                          else str(e)) from None
    if sp.terminal:
        raise ConfigError(key, f"{bundle / 'config.json'}: process.terminal: nsinitd captures a program's output, "
                               "it gives no terminal")
    if any(sp.hooks.values()):
        raise ConfigError(key, f"{bundle / 'config.json'}: hooks: not run by nsinitd (nsrun runs them)")
    return sp


def _check_containers(sup: SupervisorConfig, progs: Mapping[str, ProgramConfig]) -> None:
    """What can only be seen across programs, or inside their container.json: a container that
    could never start, two containers in one cgroup, and a state_dir a container could write."""
    containers = [p for p in progs.values() if p.container is not None or p.bundle is not None]
    if not containers:
        return
    state_dir = os.path.realpath(sup.state_dir)
    cgroups: dict[tuple[str, str], str] = {}
    for p in containers:
        if p.bundle is not None:
            key = f"programs.{p.name}.bundle"
            sp = load_bundle(key, p.bundle)
            cc, root = sp.config, Path(sp.rootfs)
        else:
            assert p.container is not None
            key = f"programs.{p.name}.container"
            root = p.container
            file = p.container / "container.json"
            try:
                cc = load_container_config(file)
            except ContainerConfigError as e:  # the file's own problems name it; a field's doesn't
                raise ConfigError(key, str(e) if e.path == str(file) else f"{file}: {e}") from None
        rootfs = os.path.realpath(root)
        if os.path.commonpath([state_dir, rootfs]) == rootfs:
            raise ConfigError("supervisor.state_dir", f"{sup.state_dir} is inside programs.{p.name}'s rootfs "
                                                      f"{root}: a container could forge nsinitd's records there")
        if cc.cgroups.name is not None:  # unset: a name of its own, derived from the container
            fixed = (cc.cgroups.parent, cc.cgroups.name)
            if fixed in cgroups:
                raise ConfigError(key, f'cgroups.name "{"/".join(fixed)}" is programs.{cgroups[fixed]}\'s too: '
                                       "two containers cannot share one cgroup")
            cgroups[fixed] = p.name


def loads(text: str, path: Path) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(str(path), "invalid TOML: nested too deeply") from None
    return parse(data, path)


def load(path: str | Path) -> Config:
    """Read and validate a config file; raise ConfigError with a one-line message."""
    p = Path(path).absolute()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    return loads(text, p)
