"""Container networking: loopback, veth pairs on a host bridge, addresses and routes.

Two halves, because they run in different processes:

* ``loopback_up()`` (libc.py, re-exported here) runs in the container right after its namespaces exist. It uses two
  ioctls on a datagram socket and imports nothing beyond the stdlib: it is on every start path.
* ``setup()`` / ``teardown()`` run on the host side and talk netlink through pyroute2, which is
  imported inside them only (it costs ~140 ms), and only when a config asks for more than loopback.

Everything inside the container's network namespace is configured from the host side, through a
netlink socket *opened* inside that namespace: a netlink socket stays bound to the namespace it was
created in, so a short-lived thread ``setns()``-es into ``/proc/<pid>/ns/net``, creates the socket and
ends. A network namespace is per thread, so this works from a multithreaded caller (trio, a
supervisor) where forking a helper would not be safe, and the caller's own thread never moves.

The veth peer is created directly inside the container's namespace (``IFLA_NET_NS_FD`` in the peer's
attributes), so it never exists, even briefly, under a temporary name in the host's namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import libc
from .errors import SetupError, TeardownError
from .libc import loopback_up as loopback_up  # (it lives with the syscalls: see below)

if TYPE_CHECKING:
    from .config import ContainerConfig, Network, Route

IFNAMSIZ = 16  # including the NUL: names are at most 15 bytes
_IFA_F_NODAD = 0x02
_RTM_GROUPS_NONE = 0  # our sockets only ask and answer; no multicast events to queue up
_TEARDOWN_WAIT = 2.0  # seconds a deleted link may take to vanish before teardown gives up


def _ename(err: int | None) -> str:
    return errno.errorcode.get(err or 0, str(err))


# ---------------------------------------------------------------------------------------------- loopback


# loopback_up, imported above: lo comes up inside every container with NEWNET, so it lives with
# the syscalls (libc.py: stdlib only, no pyroute2); network.loopback_up stays for its callers


# ------------------------------------------------------------------------------------------------ naming


def host_link_name(prefix: str, container_id: str, index: int) -> str:
    """The host-side name of a container's ``index``-th veth: prefix + a hash of (id, index).

    Derived, not random: the same container gets the same names, so a second start of a live or
    crashed container clashes loudly instead of leaking a second pair, and the names can be found
    again from the container id alone.
    """
    import hashlib  # here, not at the top: OpenSSL's import is a few ms off every start

    room = IFNAMSIZ - 1 - len(prefix.encode())
    if room < 4:
        raise ValueError(f'"{prefix}" leaves no room for a unique suffix (15 bytes in all)')
    digest = hashlib.sha256(f"{container_id}\0{index}".encode()).hexdigest()
    return prefix + digest[: min(room, 8)]


# ------------------------------------------------------------------------------------------------- setup


@dataclass
class Handle:
    """What ``setup()`` made. ``links`` are the host-side names to record for crash cleanup."""

    links: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)  # container-side names, eth0, eth1, ...


def setup(cfg: ContainerConfig, container_id: str, pid: int) -> Handle:
    """Give the container whose PID 1 is host pid ``pid`` the veth networks and routes of ``cfg``.

    Runs in the host-side parent: bridges are looked up and host-side links made in the *caller's*
    network namespace. On any failure every link made so far is removed (their peers, addresses and
    routes go with them) and SetupError names the field and the value, e.g.
    ``networks[1].context.bridge: no bridge "br9" (ENODEV)``.
    """
    handle = Handle()
    if not any(n.type == "veth" for n in cfg.networks) and not cfg.routes:
        return handle  # loopback / netns only: no pyroute2 on this start
    nspath = f"/proc/{pid}/ns/net"
    try:
        nsfd = os.open(nspath, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError("networks", f"container process {pid}: cannot open {nspath} "
                                     f"({_ename(e.errno)})") from None
    try:
        if _same_file(nsfd, "/proc/thread-self/ns/net"):
            raise SetupError("networks", f"container process {pid} shares the caller's network namespace "
                                         "(a veth or route needs its own: NEWNET)")
        with _Session(nsfd, nspath) as s:
            try:
                for i, net in enumerate(cfg.networks):
                    if net.type == "veth":
                        with _step(f"networks[{i}]", "netlink request failed"):  # anything not named below
                            _add_veth(s, handle, f"networks[{i}]", net, container_id, i)
                for j, route in enumerate(cfg.routes):
                    with _step(f"routes[{j}]", "netlink request failed"):
                        _add_route(s, f"routes[{j}]", route)
            except BaseException as e:
                _rollback(s, handle, e)
                raise
    finally:
        os.close(nsfd)
    return handle


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _socket_in_netns(nsfd: int, what: str) -> socket.socket:
    """A rtnetlink socket created inside the namespace ``nsfd``, by a thread that ends at once."""
    out: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            libc.setns(nsfd, libc.CLONE_NEWNET, what)
            out.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=work, name="nsinit-netns-socket")
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


class _Session:
    """Two rtnetlink handles, one in the caller's namespace (host) and one in the container's."""

    def __init__(self, nsfd: int, nspath: str) -> None:
        self.nsfd = nsfd
        self.nspath = nspath
        self.host: Any = None
        self.inside: Any = None
        self.routes: list[dict[str, Any]] = []  # added inside on links we didn't make (e.g. lo)
        self.defaults: list[dict[str, Any]] = []  # default routes the veth networks added

    def __enter__(self) -> _Session:
        from pyroute2 import IPRoute

        try:
            sock = _socket_in_netns(self.nsfd, self.nspath)
        except OSError as e:
            raise SetupError("networks", f"cannot enter {self.nspath}: {_ename(e.errno)}") from None
        try:
            self.inside = IPRoute(fileno=sock.fileno(), groups=_RTM_GROUPS_NONE)
            sock.detach()  # pyroute2 owns (and closes) the descriptor from here on
            self.host = IPRoute(groups=_RTM_GROUPS_NONE)
        except BaseException:
            if self.inside is None:
                sock.close()
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ipr in (self.inside, self.host):
            if ipr is not None:
                ipr.close()
        self.inside = self.host = None


def _link(ipr: Any, name: str) -> Any | None:
    """The link message for ``name``, or None when there is no such link."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _kind(msg: Any) -> str | None:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


@contextmanager
def _step(path: str, what: str) -> Iterator[None]:
    """Turn a netlink or OS failure into SetupError(path, "<what> (ERRNO)")."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except NetlinkError as e:
        raise SetupError(path, f"{what} ({_ename(e.code)})") from None
    except OSError as e:
        raise SetupError(path, f"{what} ({_ename(e.errno)})") from None


def _add_veth(s: _Session, handle: Handle, path: str, net: Network, container_id: str, index: int) -> None:
    assert net.bridge is not None  # config: a veth network always names its bridge
    try:
        host_name = host_link_name(net.prefix, container_id, index)
    except ValueError as e:
        raise SetupError(f"{path}.context.prefix", str(e)) from None
    peer = f"eth{len(handle.interfaces)}"
    bridge = _link(s.host, net.bridge)
    if bridge is None:
        raise SetupError(f"{path}.context.bridge", f'no bridge "{net.bridge}" (ENODEV)')
    if _kind(bridge) != "bridge":
        raise SetupError(f"{path}.context.bridge", f'"{net.bridge}" is not a bridge (it is a '
                                                   f"{_kind(bridge) or 'plain device'})")
    if _link(s.host, host_name) is not None:
        raise SetupError(f"{path}.context.prefix", f'host link "{host_name}" already exists (EEXIST): '
                                                   "this container id is running, or a crashed run left it")
    if _link(s.inside, peer) is not None:
        raise SetupError(path, f'the container already has a link "{peer}" (EEXIST)')

    # Recorded before the add, so an interruption between the kernel's reply and the next line
    # can't leak it; the pre-check above makes sure the name isn't someone else's.
    handle.links.append(host_name)
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        s.host.link("add", ifname=host_name, kind="veth", peer={"ifname": peer, "net_ns_fd": s.nsfd})
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            handle.links.pop()  # made by someone else since the check: not ours to delete
        raise SetupError(f"{path}.context.prefix", f'veth "{host_name}" <-> container "{peer}" '
                                                   f"({_ename(e.code)})") from None
    handle.interfaces.append(peer)

    h_index = s.host.link("get", ifname=host_name)[0]["index"]
    if net.mtu is not None:
        with _step(f"{path}.mtu", f'{net.mtu} rejected by host link "{host_name}"'):
            s.host.link("set", index=h_index, mtu=net.mtu)
    with _step(f"{path}.context.bridge", f'cannot attach "{host_name}" to bridge "{net.bridge}"'):
        s.host.link("set", index=h_index, master=bridge["index"])
    with _step(path, f'cannot bring host link "{host_name}" up'):
        s.host.link("set", index=h_index, state="up")

    c_index = s.inside.link("get", ifname=peer)[0]["index"]
    if net.mtu is not None:
        with _step(f"{path}.mtu", f'{net.mtu} rejected by container link "{peer}"'):
            s.inside.link("set", index=c_index, mtu=net.mtu)
    if net.address is not None:
        iface = ipaddress.ip_interface(net.address)
        # The runtime was told this address outright; duplicate detection would only leave an IPv6
        # address "tentative" (unusable) for the first seconds of the container's life.
        flags = _IFA_F_NODAD if iface.version == 6 else 0
        with _step(f"{path}.address", f'cannot add "{net.address}" to "{peer}"'):
            s.inside.addr("add", index=c_index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                          flags=flags)
    with _step(path, f'cannot bring container link "{peer}" up'):
        s.inside.link("set", index=c_index, state="up")
    if net.gateway is not None:
        gw = ipaddress.ip_address(net.gateway)
        fam = socket.AF_INET6 if gw.version == 6 else socket.AF_INET
        with _step(f"{path}.gateway", f'no default route via "{net.gateway}" on "{peer}"'
                                      + (f" from {net.address}" if net.address else "")):
            spec = {"family": fam, "dst": "::/0" if gw.version == 6 else "0.0.0.0/0", "gateway": net.gateway,
                    "oif": c_index}
            s.inside.route("add", **spec)
            s.defaults.append(spec)


def _route_family(route: Route) -> int:
    for a in (route.destination, route.gateway, route.source):
        if a is not None and a != "default":
            return socket.AF_INET6 if ":" in a else socket.AF_INET
    return socket.AF_INET


def _add_route(s: _Session, path: str, route: Route) -> None:
    fam = _route_family(route)
    spec: dict[str, Any] = {"family": fam}
    if route.destination is None or route.destination == "default":
        spec["dst"] = "::/0" if fam == socket.AF_INET6 else "0.0.0.0/0"
    else:
        spec["dst"] = str(ipaddress.ip_network(route.destination, strict=False))
    if route.gateway is not None:
        spec["gateway"] = route.gateway
    if route.source is not None:
        spec["prefsrc"] = route.source
    if route.interface_name is not None:
        msg = _link(s.inside, route.interface_name)
        if msg is None:
            raise SetupError(f"{path}.interface_name", f'no link "{route.interface_name}" in the container '
                                                       "(ENODEV)")
        spec["oif"] = msg["index"]
    # The libcontainer sample repeats its veth's default route in "routes": the same route twice
    # is what was asked for, not a clash.
    for d in s.defaults:
        same = all(spec.get(k) == d[k] for k in ("family", "dst", "gateway"))
        if same and spec.get("oif", d["oif"]) == d["oif"]:
            return
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        s.inside.route("add", **spec)
    except NetlinkError as e:
        # name the field the kernel is most likely objecting to
        if e.code == errno.ENETUNREACH and route.gateway is not None:
            field_, what = "gateway", f'"{route.gateway}" is not reachable on-link'
        elif e.code == errno.EINVAL and route.source is not None:
            field_, what = "source", f'"{route.source}" is not an address of the container'
        elif e.code == errno.EEXIST:
            field_, what = "destination", f'a route to "{spec["dst"]}" already exists'
        else:
            field_, what = "", f"cannot add a route to {spec['dst']}"
        raise SetupError(f"{path}.{field_}" if field_ else path, f"{what} ({_ename(e.code)})") from None
    s.routes.append(spec)


def _rollback(s: _Session, handle: Handle, cause: BaseException) -> None:
    """Undo a failed setup. A veth's peer, its addresses and routes go with the host side."""
    from pyroute2.netlink.exceptions import NetlinkError

    for spec in reversed(s.routes):  # routes on links we didn't make (lo, a joined namespace's own)
        try:
            s.inside.route("del", **spec)
        except NetlinkError:
            pass  # already gone with its link
    s.routes.clear()
    try:
        teardown(handle.links, ipr=s.host)
    except TeardownError as e:
        if isinstance(cause, SetupError):
            raise SetupError(cause.step, f"{str(cause)[len(cause.step) + 2 :]}; and cleaning up: {e}") from e
        raise SetupError("networks", f"cleaning up after {cause!r}: {e}") from e
    handle.links.clear()
    handle.interfaces.clear()


# ---------------------------------------------------------------------------------------------- teardown


def teardown(links: Iterable[str], *, ipr: Any = None) -> list[str]:
    """Delete each host-side veth in ``links`` that still exists, and check that it is gone.

    Returns the names this call removed. Idempotent: a name that no longer exists is skipped (the
    kernel deletes a veth on its own once the container's namespace dies, but later and not
    reliably soon, so we don't rely on it). A link of that name that is not a veth is not ours and is
    left alone. Raises TeardownError naming every link still present after a bounded wait.
    """
    names = [n for n in links if n]
    if not names:
        return []
    if ipr is None:
        from pyroute2 import IPRoute

        with IPRoute(groups=_RTM_GROUPS_NONE) as own:
            return teardown(names, ipr=own)
    from pyroute2.netlink.exceptions import NetlinkError

    removed: list[str] = []
    stuck: list[str] = []
    for name in names:
        try:
            msg = _link(ipr, name)
            if msg is None or _kind(msg) != "veth":
                continue
            cause = ""
            try:
                ipr.link("del", index=msg["index"])
            except NetlinkError as e:
                if e.code != errno.ENODEV:  # ENODEV: the kernel beat us to it
                    cause = f": delete failed ({_ename(e.code)})"
            deadline = time.monotonic() + _TEARDOWN_WAIT
            while _link(ipr, name) is not None:
                if time.monotonic() > deadline:
                    stuck.append(f'host link "{name}" still present{cause}')
                    break
                time.sleep(0.02)
            else:
                removed.append(name)
        except NetlinkError as e:
            stuck.append(f'host link "{name}": cannot look it up ({_ename(e.code)})')
    if stuck:
        raise TeardownError("; ".join(stuck))
    return removed
