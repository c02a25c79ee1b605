"""Private network worlds for the network tests.

A test's "host" is an anonymous network namespace held only by a file descriptor: a thread
unshare()s it and ends, the fd keeps it alive, closing the fd (and ending the processes in it)
destroys it with every link inside. Nothing is named, bind-mounted, or added to the real host's
namespace, so a killed test run can't leave a namespace behind either.

Work "on the host" runs in a short-lived thread that setns()-es into that namespace (a network
namespace is per thread), so the test process itself never moves. Processes started from such a
thread (subprocess) start in that namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from nsruntime import libc

T = TypeVar("T")
Completed = subprocess.CompletedProcess[str]

# RFC 2544 benchmarking space (198.18.0.0/15) and its IPv6 sibling (RFC 5180, 2001:2::/48): never routed
# anywhere real, and nothing here has a route off the test's own bridge anyway.
NET4 = "198.18.0"
NET6 = "2001:2:0:1"


def _in_thread(fn: Callable[[], T]) -> T:
    out: list[Any] = []

    def work() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:
            out.append((False, e))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    ok, val = out[0]
    if not ok:
        raise val
    return val  # type: ignore[no-any-return]


def new_netns() -> int:
    """A new, empty network namespace; the returned fd is its only reference."""

    def make() -> int:
        libc.unshare(libc.CLONE_NEWNET)
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    return _in_thread(make)


def in_netns(fd: int, fn: Callable[[], T]) -> T:
    """Run fn in a thread inside the namespace fd."""

    def run() -> T:
        libc.setns(fd, libc.CLONE_NEWNET)
        return fn()

    return _in_thread(run)


def ns_ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class Host:
    """A namespace standing in for the host, with a bridge holding the gateway addresses."""

    def __init__(self, bridge: str = "nsbr0", mtu: int | None = None) -> None:
        self.fd = new_netns()
        self.bridge = bridge
        self.procs: list[subprocess.Popen[bytes]] = []
        cmds = [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{NET4}.1/24", "dev", bridge],
            ["ip", "addr", "add", f"{NET6}::1/64", "dev", bridge, "nodad"],
            ["ip", "link", "set", bridge, "up"],
        ]
        if mtu:
            cmds.insert(2, ["ip", "link", "set", bridge, "mtu", str(mtu)])
        for c in cmds:
            self.run(c)

    def call(self, fn: Callable[[], T]) -> T:
        return in_netns(self.fd, fn)

    def run(self, cmd: list[str], timeout: float = 10, check: bool = True) -> Completed:
        return self.call(lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                                check=check))

    def popen(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        p = self.call(lambda: subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        self.procs.append(p)
        return p

    def links(self) -> dict[str, dict[str, Any]]:
        return {li["ifname"]: li for li in json.loads(self.run(["ip", "-j", "-d", "link", "show"]).stdout)}

    def veths(self) -> list[str]:
        return sorted(n for n, li in self.links().items()
                      if li.get("linkinfo", {}).get("info_kind") == "veth")

    def standin(self) -> StandIn:
        """A stand-in container: a process in a fresh network namespace of its own, born here."""
        p = self.popen(["unshare", "--net", "--", "sleep", "60"])
        s = StandIn(p)
        deadline = time.monotonic() + 5
        mine = self.call(lambda: ns_ident("/proc/thread-self/ns/net"))
        while True:  # unshare(1) unshares, then execs sleep: wait for the first half
            try:
                if ns_ident(f"/proc/{p.pid}/ns/net") != mine:
                    return s
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in container never left the host namespace")
            time.sleep(0.005)

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        os.close(self.fd)


class StandIn:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid

    def run(self, cmd: list[str], timeout: float = 10, check: bool = True) -> Completed:
        return subprocess.run(["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *cmd],
                              capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *cmd],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)

    def links(self) -> dict[str, dict[str, Any]]:
        return {li["ifname"]: li for li in json.loads(self.run(["ip", "-j", "-d", "addr", "show"]).stdout)}

    def routes(self, family: str = "-4") -> list[dict[str, Any]]:
        return json.loads(self.run(["ip", "-j", family, "route", "show"]).stdout)  # type: ignore[no-any-return]


def stop(p: subprocess.Popen[Any], timeout: float = 5) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout)


def children() -> list[str]:
    """This process's live children (pid and command), to check that a test left none running."""
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command may hold spaces and parentheses
        if fields[1] == me and fields[0] != "Z":
            out.append(f"{pid} {stat[stat.index('(') + 1 : stat.rindex(')')]}")
    return out
