"""Container networking (issue 4): loopback, veth pairs on a bridge, addresses, routes, teardown.

Every test builds its own world (see netutil): an anonymous network namespace plays the host, with
the bridge nsbr0 (198.18.0.1/24, 2001:2:0:1::1/64) inside it; stand-in containers are processes that
unshare a network namespace of their own. Traffic flows only between those namespaces. The end-to-end
tests at the bottom run real containers through ``python -m nsruntime.cli`` and skip while the
runtime's verbs don't exist yet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nsruntime import config, network
from nsruntime.errors import ConfigError, SetupError, TeardownError
from nsruntime.lean import replace
from tests.conftest import live_pid, records, wait_for
from tests.runtime.netutil import NET4, NET6, Host, StandIn, children, in_netns, new_netns, stop

pytestmark = [
    pytest.mark.network,
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.timeout(30),
]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    try:
        yield h
    finally:
        h.close()
    # the test's world went with its namespace and nothing it started runs on (tests/conftest.py checks
    # the real host's links, namespaces, mounts and cgroups around every test)
    assert children() == []


def veth(address: str | None = f"{NET4}.2/24", gateway: str | None = f"{NET4}.1", mtu: int | None = None,
         bridge: str = "nsbr0", prefix: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "veth", "context": {"bridge": bridge}}
    if prefix:
        d["context"]["prefix"] = prefix
    for k, v in (("address", address), ("gateway", gateway), ("mtu", mtu)):
        if v is not None:
            d[k] = v
    return d


def cfg(*networks: dict[str, Any], routes: list[dict[str, Any]] | None = None) -> config.ContainerConfig:
    return config.parse({"networks": list(networks), "routes": routes or []})


def setup(host: Host, c: config.ContainerConfig, cid: str, pid: int) -> network.Handle:
    return host.call(lambda: network.setup(c, cid, pid))


def teardown(host: Host, links: list[str]) -> list[str]:
    return host.call(lambda: network.teardown(links))


def assert_nothing_left(host: Host, *containers: StandIn) -> None:
    assert host.veths() == []
    for c in containers:
        assert set(c.links()) == {"lo"}, "a veth peer, address or link is left in the container"


def addrs(link: dict[str, Any], family: str = "inet") -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a["family"] == family]


def ping(c: StandIn, address: str) -> subprocess.CompletedProcess[str]:
    return c.run(["busybox", "ping", "-c", "1", "-W", "2", address], check=False)


# ------------------------------------------------------------------------------------------ loopback


def test_loopback_up_brings_lo_up_with_stdlib_only() -> None:
    fd = new_netns()
    try:
        def probe() -> list[str]:
            before = json.loads(subprocess.run(["ip", "-j", "link", "show", "lo"], capture_output=True,
                                               check=True).stdout)[0]["flags"]
            assert "UP" not in before
            network.loopback_up()
            network.loopback_up()  # already up: nothing to do, no error
            out = subprocess.run(["ip", "-j", "link", "show", "lo"], capture_output=True, check=True)
            ping = subprocess.run(["busybox", "ping", "-c", "1", "-W", "2", "127.0.0.1"], capture_output=True)
            assert ping.returncode == 0, ping.stdout
            return json.loads(out.stdout)[0]["flags"]  # type: ignore[no-any-return]

        assert "UP" in in_netns(fd, probe)
    finally:
        os.close(fd)


def test_loopback_and_netns_only_never_import_pyroute2(tmp_path: Path) -> None:
    # the start path stays light: nothing but loopback/netns must not pay for pyroute2
    code = textwrap.dedent("""
        import os, sys
        from nsruntime import config, network
        c = config.parse({"networks": [{"type": "loopback", "address": "127.0.0.1/0", "gateway": "localhost"},
                                       {"type": "netns", "context": {"path": "/proc/self/ns/net"}}]})
        assert network.setup(c, "light", os.getpid()).links == []
        assert network.teardown([]) == []
        assert "pyroute2" not in sys.modules, "pyroute2 was imported"
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=20)
    assert r.returncode == 0, r.stderr


# -------------------------------------------------------------------------------------- veth setup


def test_veth_address_mtu_default_route_and_host_side_on_bridge(host: Host) -> None:
    c = host.standin()
    h = setup(host, cfg(veth(mtu=1400, prefix="nst")), "ctr-a", c.pid)
    assert h.interfaces == ["eth0"]
    [name] = h.links
    assert name.startswith("nst") and len(name.encode()) <= 15
    assert name == network.host_link_name("nst", "ctr-a", 0)

    inside = c.links()
    assert set(inside) == {"lo", "eth0"}
    eth0 = inside["eth0"]
    assert addrs(eth0) == [f"{NET4}.2/24"]
    assert eth0["mtu"] == 1400
    assert "UP" in eth0["flags"]
    assert eth0["linkinfo"]["info_kind"] == "veth"
    assert {"dst": "default", "gateway": f"{NET4}.1", "dev": "eth0"}.items() <= c.routes()[0].items()

    hl = host.links()[name]
    assert hl["master"] == "nsbr0"
    assert hl["mtu"] == 1400
    assert "UP" in hl["flags"]
    assert hl["linkinfo"]["info_kind"] == "veth"

    r = ping(c, f"{NET4}.1")
    assert r.returncode == 0, r.stdout + r.stderr

    assert teardown(host, h.links) == [name]
    assert_nothing_left(host, c)
    assert teardown(host, h.links) == []  # idempotent


def test_two_containers_on_one_bridge_reach_each_other_v4_and_v6(host: Host) -> None:
    a, b = host.standin(), host.standin()
    ha = setup(host, cfg(veth(f"{NET4}.2/24"), veth(f"{NET6}::2/64", f"{NET6}::1")), "ctr-a", a.pid)
    hb = setup(host, cfg(veth(f"{NET4}.3/24"), veth(f"{NET6}::3/64", f"{NET6}::1")), "ctr-b", b.pid)
    assert ha.interfaces == hb.interfaces == ["eth0", "eth1"]
    assert len(set(ha.links + hb.links)) == 4
    assert addrs(b.links()["eth1"], "inet6")[0] == f"{NET6}::3/64"
    assert {"dst": "default", "gateway": f"{NET6}::1", "dev": "eth1"}.items() <= \
        next(r for r in b.routes("-6") if r["dst"] == "default").items()
    try:
        for server_addr in (f"{NET4}.3", f"{NET6}::3"):
            assert echo(server=b, client=a, address=server_addr) == b"HELLO FROM A"
        r = ping(a, f"{NET6}::1")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        removed = teardown(host, ha.links + hb.links)
    assert sorted(removed) == sorted(ha.links + hb.links)
    assert_nothing_left(host, a, b)


def echo(server: StandIn, client: StandIn, address: str, port: int = 7777) -> bytes:
    """One listens inside its namespace, the other connects and gets its message back upper-cased."""
    srv = server.popen([sys.executable, "-c", textwrap.dedent(f"""
        import socket
        s = socket.create_server(({address!r}, {port}), family=socket.AF_INET6 if ":" in {address!r} else
                                 socket.AF_INET)
        s.settimeout(10)
        print("ready", flush=True)
        c, _ = s.accept()
        c.sendall(c.recv(100).upper())
    """)])
    try:
        assert srv.stdout is not None
        assert srv.stdout.readline() == b"ready\n"
        r = client.run([sys.executable, "-c", textwrap.dedent(f"""
            import socket, sys
            c = socket.create_connection(({address!r}, {port}), timeout=5)
            c.sendall(b"hello from a")
            sys.stdout.write(c.recv(100).decode())
        """)], timeout=15)
        return r.stdout.encode()
    finally:
        stop(srv)
        if srv.stdout:
            srv.stdout.close()


def test_routes_added_inside_including_the_samples_repeated_default(host: Host) -> None:
    c = host.standin()
    routes = [
        {"gateway": f"{NET4}.1", "interface_name": "eth0"},  # the sample repeats the veth's default route
        {"destination": "198.19.5.0/24", "gateway": f"{NET4}.1"},
        {"destination": "198.19.6.0/24", "interface_name": "eth0", "source": f"{NET4}.2"},
        {"destination": "2001:2:0:9::/64", "gateway": f"{NET6}::1"},
    ]
    h = setup(host, cfg(veth(), veth(f"{NET6}::2/64", None), routes=routes), "ctr-r", c.pid)
    try:
        got = {r["dst"]: r for r in c.routes()}
        assert got["default"]["gateway"] == f"{NET4}.1"
        assert got["198.19.5.0/24"]["gateway"] == f"{NET4}.1"
        assert got["198.19.6.0/24"]["dev"] == "eth0" and got["198.19.6.0/24"]["prefsrc"] == f"{NET4}.2"
        got6 = {r["dst"]: r for r in c.routes("-6")}
        assert got6["2001:2:0:9::/64"]["gateway"] == f"{NET6}::1"
        assert "default" not in got6
    finally:
        teardown(host, h.links)
    assert_nothing_left(host, c)


def test_links_vanish_with_the_container_and_teardown_still_checks(host: Host) -> None:
    c = host.standin()
    h = setup(host, cfg(veth()), "ctr-gone", c.pid)
    stop(c.proc)  # the container ends: its namespace dies, the kernel removes the pair in its own time
    teardown(host, h.links)  # removes it if the kernel hasn't yet, checks either way
    assert host.veths() == []
    assert teardown(host, h.links) == []


def test_teardown_leaves_a_link_that_is_not_a_veth_alone(host: Host) -> None:
    host.run(["ip", "link", "add", "nstbr1", "type", "bridge"])
    assert teardown(host, ["nstbr1", "nosuchlink"]) == []
    assert "nstbr1" in host.links()


def test_teardown_names_a_link_that_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel can't be made to refuse a delete on demand: a stand-in netlink handle that ignores it
    class Stubborn:
        def link(self, cmd: str, **kw: Any) -> list[Any]:
            if cmd == "get":
                return [{"index": 7}]
            return []

    monkeypatch.setattr(network, "_kind", lambda msg: "veth")
    monkeypatch.setattr(network, "_TEARDOWN_WAIT", 0.1)
    with pytest.raises(TeardownError, match='host link "vethstuck" still present'):
        network.teardown(["vethstuck"], ipr=Stubborn())


def test_a_rollback_that_cannot_remove_a_link_says_so(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    c = host.standin()
    real_teardown = network.teardown

    def stuck(links: list[str], **kw: Any) -> list[str]:
        raise TeardownError(f'host link "{links[0]}" still present')

    monkeypatch.setattr(network, "teardown", stuck)
    with pytest.raises(SetupError) as e:
        setup(host, cfg(veth(), veth(f"{NET4}.3/24", bridge="br9")), "ctr-x", c.pid)
    name = network.host_link_name("veth", "ctr-x", 0)
    assert str(e.value) == (f'networks[1].context.bridge: no bridge "br9" (ENODEV); and cleaning up: '
                            f'host link "{name}" still present')
    assert host.veths() == [name]
    monkeypatch.setattr(network, "teardown", real_teardown)
    assert teardown(host, [name]) == [name]


# ------------------------------------------------------------------------------- bad input, nothing left


def test_missing_bridge_names_field_and_leaves_nothing(host: Host) -> None:
    c = host.standin()
    bad = cfg(veth(), veth(f"{NET4}.3/24", bridge="br9"))  # the first pair is made, then must go again
    with pytest.raises(SetupError) as e:
        setup(host, bad, "ctr-x", c.pid)
    assert str(e.value) == 'networks[1].context.bridge: no bridge "br9" (ENODEV)'
    assert_nothing_left(host, c)


def test_a_bridge_that_is_not_a_bridge(host: Host) -> None:
    c = host.standin()
    with pytest.raises(SetupError, match=r'^networks\[0\].context.bridge: "lo" is not a bridge'):
        setup(host, cfg(veth(bridge="lo")), "ctr-x", c.pid)
    assert_nothing_left(host, c)


@pytest.mark.parametrize(("network_", "where", "what"), [
    (veth("198.18.0.300/24"), "networks[0].address", "is not an address in CIDR form"),
    (veth("eth0"), "networks[0].address", "is not an address in CIDR form"),
    (veth(f"{NET4}.2"), "networks[0].address", "has no prefix length"),
    (veth(gateway="198.19.0.1"), "networks[0].gateway", "is not another host on 198.18.0.0/24"),
    (veth(gateway=f"{NET6}::1"), "networks[0].gateway", "not of the same IP version"),
    (veth(mtu=70000), "networks[0].mtu", "out of range"),
    (veth(mtu=0), "networks[0].mtu", "out of range"),
    (veth(f"{NET6}::2/64", f"{NET6}::1", mtu=1000), "networks[0].mtu", "below IPv6's minimum"),
    (veth(prefix="much-too-long"), "networks[0].context.prefix", "1..7 characters"),
])
def test_bad_values_stop_at_the_config(network_: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(network_)
    assert e.value.path == where and what in str(e.value)


@pytest.mark.parametrize(("route", "where", "what"), [
    ({"destination": "198.19.5.0/24"}, "routes[0]", "needs a gateway or an interface_name"),
    ({"destination": "198.19.5.0/24", "gateway": f"{NET6}::1"}, "routes[0]", "mixes IPv4 and IPv6"),
    ({"destination": "198.19.5.0", "gateway": f"{NET4}.1"}, "routes[0].destination", "no prefix length"),
    ({"gateway": "nonsense"}, "routes[0].gateway", "is not an IP address"),
])
def test_bad_routes_stop_at_the_config(route: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(routes=[route])
    assert e.value.path == where and what in str(e.value)


def test_mtu_the_kernel_refuses_leaves_nothing(host: Host) -> None:
    # past the config's check (a caller building Network itself): the kernel's EINVAL is named too
    c = host.standin()
    good = cfg(veth(), veth(f"{NET4}.3/24"))
    bad = replace(good, networks=(good.networks[0], replace(good.networks[1], mtu=70000)))
    with pytest.raises(SetupError, match=r'^networks\[1\]\.mtu: 70000 rejected by host link "veth\w+" \(EINVAL\)$'):
        setup(host, bad, "ctr-x", c.pid)
    assert_nothing_left(host, c)


def test_prefix_leaving_no_room_for_the_suffix(host: Host) -> None:
    c = host.standin()
    good = cfg(veth())
    bad = replace(good, networks=(replace(good.networks[0], prefix="twelve-chars"),))
    with pytest.raises(SetupError, match=r"^networks\[0\]\.context\.prefix: .* leaves no room"):
        setup(host, bad, "ctr-x", c.pid)
    assert_nothing_left(host, c)


def test_unreachable_gateway_the_kernel_refuses_leaves_nothing(host: Host) -> None:
    c = host.standin()
    good = cfg(veth())
    bad = replace(good, networks=(replace(good.networks[0], gateway="198.19.0.1"),))
    with pytest.raises(SetupError, match=r'^networks\[0\]\.gateway: .*"198.19.0.1".* \(ENETUNREACH\)$'):
        setup(host, bad, "ctr-x", c.pid)
    assert_nothing_left(host, c)


def test_host_name_clash_names_the_link_and_spares_the_other_one(host: Host) -> None:
    a, b = host.standin(), host.standin()
    ha = setup(host, cfg(veth()), "same-id", a.pid)
    with pytest.raises(SetupError) as e:
        setup(host, cfg(veth(f"{NET4}.3/24")), "same-id", b.pid)  # a second start of the same container
    assert str(e.value).startswith(f'networks[0].context.prefix: host link "{ha.links[0]}" already exists (EEXIST)')
    assert host.veths() == ha.links, "the failed setup removed the first container's link"
    assert set(b.links()) == {"lo"}
    teardown(host, ha.links)
    assert_nothing_left(host, a)


def test_container_name_clash_leaves_nothing(host: Host) -> None:
    c = host.standin()
    c.run(["ip", "link", "add", "eth0", "type", "bridge"])
    with pytest.raises(SetupError, match=r'^networks\[0\]: the container already has a link "eth0" \(EEXIST\)$'):
        setup(host, cfg(veth()), "ctr-x", c.pid)
    assert host.veths() == []
    assert set(c.links()) == {"lo", "eth0"}  # its own eth0, untouched


def test_bad_route_rolls_back_every_veth(host: Host) -> None:
    c = host.standin()
    bad = cfg(veth(), veth(f"{NET6}::2/64", f"{NET6}::1"),
              routes=[{"destination": "198.19.5.0/24", "gateway": f"{NET4}.1"},
                      {"destination": "198.19.6.0/24", "interface_name": "eth7"}])
    with pytest.raises(SetupError, match=r'^routes\[1\]\.interface_name: no link "eth7" in the container'):
        setup(host, bad, "ctr-x", c.pid)
    assert_nothing_left(host, c)


def test_route_on_lo_is_removed_again_when_setup_fails(host: Host) -> None:
    # a route on a link setup didn't make doesn't go away with the veth: rollback removes it
    c = host.standin()
    c.run(["ip", "link", "set", "lo", "up"])
    bad = cfg(routes=[{"destination": "198.19.7.0/24", "interface_name": "lo"},
                      {"destination": "198.19.8.0/24", "gateway": "198.19.9.1"}])
    with pytest.raises(SetupError, match=r'^routes\[1\]\.gateway: "198.19.9.1" is not reachable on-link'):
        setup(host, bad, "ctr-x", c.pid)
    assert c.routes() == []


def test_container_that_is_gone_or_shares_the_host_namespace(host: Host) -> None:
    c = host.standin()
    pid = c.pid
    stop(c.proc)
    with pytest.raises(SetupError, match=rf"^networks: container process {pid}: cannot open"):
        setup(host, cfg(veth()), "ctr-x", pid)
    same = host.popen(["sleep", "30"])  # a "container" without a network namespace of its own
    with pytest.raises(SetupError, match="shares the caller's network namespace"):
        setup(host, cfg(veth()), "ctr-x", same.pid)
    assert host.veths() == []


# ---------------------------------------------------------------------------- end to end: nsinit exec

e2e = pytest.mark.privileged


def busybox_rootfs(root: Path) -> None:
    bb = shutil.which("busybox")
    if bb is None:
        pytest.skip("no busybox")
    (root / "bin").mkdir(parents=True)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (root / d).mkdir()
    shutil.copy2(bb, root / "bin" / "busybox")
    for applet in ("sh", "ip", "ping", "cat", "sleep", "nc", "echo", "ifconfig", "route"):
        (root / "bin" / applet).symlink_to("busybox")


def sample_network(address: str = f"{NET4}.101/24") -> dict[str, Any]:
    """The libcontainer sample's network section, with the test's own bridge and addresses."""
    return {
        "networks": [
            {"type": "loopback", "address": "127.0.0.1/0", "gateway": "localhost"},
            {"type": "veth", "context": {"bridge": "nsbr0", "prefix": "veth"}, "address": address,
             "gateway": f"{NET4}.1", "mtu": 1450},
        ],
        "routes": [
            {"gateway": f"{NET4}.1", "interface_name": "eth0"},
            {"destination": "198.19.10.0/24", "interface_name": "eth0"},
        ],
    }


def nsinit(host: Host, cdir: Path, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return host.call(lambda: subprocess.run([sys.executable, "-m", "nsruntime.cli", "exec", *cmd], cwd=cdir,
                                            capture_output=True, text=True, timeout=timeout, env=env))


@pytest.fixture
def container_dir(tmp_path: Path) -> Path:
    """A busybox rootfs; nsinit takes the current directory as the rootfs and reads container.json there."""
    root = tmp_path / "rootfs"
    busybox_rootfs(root)
    return root


def write_config(cdir: Path, extra: dict[str, Any]) -> None:
    base: dict[str, Any] = {"hostname": "nettest", "namespaces": ["NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET"]}
    (cdir / "container.json").write_text(json.dumps({**base, **extra}))


@e2e
def test_e2e_sample_network_seen_from_inside_and_gone_after(host: Host, container_dir: Path) -> None:
    write_config(container_dir, sample_network())
    script = ("ip addr show; echo ROUTES; ip route show; echo PING; ping -c 1 -W 2 198.18.0.1 && echo PINGOK; "
              "ping -c 1 -W 2 127.0.0.1 && echo LOOK")
    r = nsinit(host, container_dir, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "inet 198.18.0.101/24" in out and "mtu 1450" in out
    assert "eth0" in out and "lo" in out
    routes = out.split("ROUTES")[1].split("PING")[0]
    assert "default via 198.18.0.1 dev eth0" in routes
    assert "198.19.10.0/24 dev eth0" in routes
    assert "PINGOK" in out and "LOOK" in out
    assert host.veths() == [], "the host side outlived the container"


@e2e
def test_e2e_two_containers_talk_over_the_bridge(host: Host, container_dir: Path, tmp_path: Path) -> None:
    write_config(container_dir, sample_network())
    other = tmp_path / "rootfs2"
    busybox_rootfs(other)
    write_config(other, sample_network(f"{NET4}.102/24"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = host.call(lambda: subprocess.Popen(
        [sys.executable, "-m", "nsruntime.cli", "exec", "sh", "-c", "echo hello-from-101 | nc -l -p 7000"],
        cwd=container_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        got = ""
        for _ in range(40):  # the listener needs a moment; retry the connect, bounded
            r = nsinit(host, other, "sh", "-c", "nc -w 2 198.18.0.101 7000 </dev/null")
            got = r.stdout
            if "hello-from-101" in got:
                break
        assert "hello-from-101" in got
        server.wait(10)
    finally:
        stop(server)
        for f in (server.stdout, server.stderr):
            if f:
                f.close()
    assert host.veths() == []


@e2e
def test_e2e_missing_bridge_exits_125_with_one_line(host: Host, container_dir: Path) -> None:
    net = sample_network()
    net["networks"][1]["context"]["bridge"] = "br9"
    write_config(container_dir, net)
    r = nsinit(host, container_dir, "true")
    assert r.returncode == 125
    assert 'networks[1].context.bridge: no bridge "br9" (ENODEV)' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert host.veths() == []


@e2e
def test_e2e_netns_type_joins_an_existing_namespace(host: Host, container_dir: Path) -> None:
    c = host.standin()
    c.run(["ip", "link", "add", "nstjoin0", "type", "bridge"])
    c.run(["ip", "addr", "add", "198.18.5.1/24", "dev", "nstjoin0"])
    write_config(container_dir, {"networks": [{"type": "netns", "context": {"path": f"/proc/{c.pid}/ns/net"}}]})
    r = nsinit(host, container_dir, "ip", "addr", "show")
    assert r.returncode == 0, r.stderr
    assert "nstjoin0" in r.stdout and "198.18.5.1/24" in r.stdout
    assert "nsbr0" not in r.stdout
    assert "198.18.5.1/24" in addrs(c.links()["nstjoin0"])[0]  # joined as-is: nothing taken away
    assert host.veths() == []


def nsinit_bg(host: Host, cdir: Path, *cmd: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return host.call(lambda: subprocess.Popen([sys.executable, "-m", "nsruntime.cli", "exec", *cmd], cwd=cdir,
                                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def wait_until(pred: Any, what: str, timeout: float = 10) -> Any:
    return wait_for(pred, timeout, what)


@e2e
def test_e2e_exec_again_joins_the_network_as_is(host: Host, container_dir: Path) -> None:
    write_config(container_dir, sample_network())
    first = nsinit_bg(host, container_dir, "sleep", "30")
    try:
        wait_until(lambda: live_pid(container_dir), "the container to be up")
        [link] = host.veths()
        r = nsinit(host, container_dir, "ip", "addr", "show", "eth0")  # a live container: join it
        assert r.returncode == 0, r.stderr
        assert f"inet {NET4}.101/24" in r.stdout
        assert host.veths() == [link], "joining made (or removed) a link"
        r = nsinit(host, container_dir, "ping", "-c", "1", "-W", "2", f"{NET4}.1")
        assert r.returncode == 0, r.stdout + r.stderr
        host.call(lambda: subprocess.run([sys.executable, "-m", "nsruntime.cli", "kill", "KILL"],
                                         cwd=container_dir, env={**os.environ, "PYTHONPATH": str(REPO)},
                                         capture_output=True, timeout=10))
        first.wait(10)
    finally:
        stop(first)
        for f in (first.stdout, first.stderr):
            if f:
                f.close()
    assert host.veths() == []


@e2e
def test_e2e_link_gone_when_nsinit_itself_is_killed(host: Host, container_dir: Path) -> None:
    write_config(container_dir, sample_network())
    first = nsinit_bg(host, container_dir, "sleep", "30")
    try:
        wait_until(lambda: live_pid(container_dir), "the container to be up")
        links = host.veths()
        assert len(links) == 1
        # the state file names the host side, for whoever cleans up after a crash
        assert json.loads((records(container_dir) / "state.json").read_text())["links"] == links
        first.kill()  # no teardown code of ours runs: the container must still end and take its link along
        first.wait(10)
        wait_until(lambda: live_pid(container_dir) is None, "the container to end with nsinit")
        wait_until(lambda: host.veths() == [], "the host side to vanish", timeout=5)
    finally:
        stop(first)
        # what a crash leaves (state files, cgroups) is released the way the next start would
        from nsruntime.creator import cleanup_stale
        from nsruntime.state import StateDir

        released = host.call(lambda: cleanup_stale(StateDir(records(container_dir), remove_dir=True)))
        for f in (first.stdout, first.stderr):
            if f:
                f.close()
    assert released["links"] == []  # already gone, checked again
    assert not records(container_dir).exists()
