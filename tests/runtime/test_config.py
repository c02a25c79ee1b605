"""container.json parsing: every field, and fuzzing that only ever yields a config or a ConfigError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsruntime import ConfigError, load_config
from nsruntime.config import DEFAULT_NAMESPACES, parse
from tests.conftest import REPO, nsinit


def test_defaults() -> None:
    cfg = parse({})
    assert cfg.namespaces == DEFAULT_NAMESPACES
    assert cfg.no_new_privileges is True and cfg.tty is False and cfg.working_dir == "/"
    assert cfg.env_dict()["PATH"].startswith("/usr/local/sbin")
    assert cfg.cgroups.parent == "nsinit" and cfg.cgroups.name is None


def test_shipped_configs_parse() -> None:
    sample = load_config(REPO / "configs" / "libcontainer-sample" / "container.json")
    assert sample.hostname == "koye" and sample.tty is True
    assert [n.type for n in sample.networks] == ["loopback", "veth"]
    assert sample.networks[1].bridge == "nsinit0" and sample.networks[1].mtu == 1500
    assert sample.cgroups.name == "koye" and sample.apparmor_profile == "docker-default"
    assert 21 in sample.capabilities_mask  # SYS_ADMIN
    host = load_config(REPO / "configs" / "host" / "container.json")
    assert host.readonly_fs and {m.destination for m in host.mounts} >= {"/usr", "/bin", "/lib", "/tmp"}


def test_map_form_of_namespaces_and_environment() -> None:
    cfg = parse({"namespaces": {"NEWNS": True, "NEWNET": False, "NEWPID": True}, "environment": {"A": "1"}})
    assert cfg.namespaces == ("NEWNS", "NEWPID")
    assert cfg.environment == (("A", "1"),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"namespaces": ["NEWNS", "NEWNS"]}, 'namespaces[1]: namespace "NEWNS" listed twice'),
        ({"namespaces": ["NEWPID"]}, "namespaces: NEWNS is required"),
        ({"environment": ["NOEQUALS"]}, 'environment[0]: "NOEQUALS" is not NAME=VALUE'),
        ({"hostname": "bad host"}, 'hostname: "bad host" is not a valid host name'),
        ({"working_dir": "relative"}, 'working_dir: "relative" is not an absolute path'),
        ({"user": "a:b:c"}, 'user: "a:b:c" is not uid[:gid] or a user name'),
        ({"mounts": [{"destination": "/x"}]}, "mounts[0].source: missing"),
        ({"mounts": [{"source": "/a", "destination": "/"}]}, "mounts[0].destination: cannot mount over"),
        ({"mounts": [{"type": "nfs", "destination": "/x"}]}, 'mounts[0].type: unsupported mount type "nfs"'),
        ({"networks": [{"type": "veth", "context": {"bridge": "b"}, "mtu": 70000}]},
         "networks[0].mtu: 70000 out of range"),
        ({"networks": [{"type": "veth"}]}, "networks[0].context.bridge: missing"),
        ({"networks": [{"type": "bogus"}]}, 'networks[0].type: unknown network type "bogus"'),
        ({"networks": [{"type": "veth", "context": {"bridge": "b"}, "address": "198.18.0.2/24",
                        "gateway": "fd00::1"}]}, "networks[0].gateway"),
        ({"cgroups": {"memory_swap": 10}}, "cgroups.memory_swap: must be -1 or at least memory"),
        ({"cgroups": {"cpuset_cpus": "x"}}, 'cgroups.cpuset_cpus: "x" is not a cpu list'),
        ({"cgroups": {"parent": "../escape"}}, "cgroups.parent"),
        ({"cgroups": {"devices": [{"access": "rwx"}]}}, 'cgroups.devices[0].access: "rwx" is not made of r, w, m'),
        ({"context": {"selinux": "x"}}, "context.selinux: unknown field"),
        ({"uid_mappings": [{"container_id": 0, "host_id": 1, "size": 1}]}, "uid_mappings: only meaningful with"),
        ({"masked_paths": ["rel"]}, 'masked_paths[0]: "rel" is not an absolute path'),
        ({"tty": 1}, "tty: expected a boolean, got integer"),
        ({"cgroups": {"pids_limit": 1.5}}, "cgroups.pids_limit: expected an integer, got number"),
    ],
)
def test_bad_values_name_their_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


_USERNS = {"namespaces": ["NEWUSER", "NEWNS", "NEWPID"], "uid_mappings": [{"container_id": 0, "host_id": 1, "size": 1}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"hostname": "a" * 100_000},
         f'hostname: "{"a" * 40}"... (100000 characters) is not a valid host name'),
        ({"hostname": "two\nlines"}, 'hostname: "two\\nlines" is not a valid host name'),
        ({"environment": {"B" * 50: 7}},
         f"environment.{'B' * 40}... (50 characters): expected a string, got integer"),
        ({"cgroups": {"memory": 4096}}, "cgroups.memory: 4096 is below the 4194304 bytes (4 MiB) nsinit needs to "
                                        "set the container up (its own setup process runs in the container's cgroup)"),
        ({"cgroups": {"memory": 10**29}}, "cgroups.memory: 100000000000000000000000000000 is more than the kernel can "
                                          "hold as a limit (at most 9223372036854767616; leave the field out for no "
                                          "limit)"),
        ({"cgroups": {"memory": 1e29}}, "cgroups.memory: expected an integer (bytes), got number"),
        ({"cgroups": {"memory": 64 << 20, "memory_swap": 2**64}},
         "cgroups.memory_swap: 18446744073709551616 out of range (-1..9223372036854767616)"),
        ({"cgroups": {"pids_limit": 1}}, "cgroups.pids_limit: 1 is too low: PID 1 and the command need 2 "
                                         "(-1 for no limit)"),
        ({"cgroups": {"pids_limit": 5_000_000}}, "cgroups.pids_limit: 5000000 out of range (-1..4194304)"),
        ({**_USERNS, "cgroups": {"pids_limit": 2}},
         "cgroups.pids_limit: 2 is too low with NEWUSER: PID 1, the command and the setup process that makes them "
         "need 3 (-1 for no limit)"),
        ({"cgroups": {"cpu_quota": 2**44}}, "cgroups.cpu_quota: 17592186044416 out of range (-1..17592186044415)"),
        ({**_USERNS, "namespaces": ["NEWUSER", "NEWNS"]},
         "namespaces: NEWUSER needs NEWPID too: in a user namespace, /proc can be mounted only for a pid namespace "
         "of its own"),
    ],
)
def test_errors_are_one_line_naming_the_field_and_capping_the_value(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert str(e.value) == message


def test_load_errors(tmp_path: Path) -> None:
    p = tmp_path / "container.json"
    with pytest.raises(ConfigError, match="no such file"):
        load_config(p)
    p.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)
    p.write_text("[" * 100000)
    with pytest.raises(ConfigError, match=r"malformed JSON|nested too deeply"):
        load_config(p)
    p.write_text(" " * (1 << 20) + "{}")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(p)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
_FIELDS = ["hostname", "environment", "tty", "namespaces", "capabilities_mask", "mounts", "networks", "routes",
           "cgroups", "context", "user", "working_dir", "readonly_fs", "no_pivot_root", "uid_mappings",
           "masked_paths"]
_NAMES = ["NEWNS", "NEWPID", "NEWNET", "NEWUSER", "SYS_ADMIN", "veth", "loopback", "netns", "bind", "tmpfs",
          "source", "destination", "type", "context", "bridge", "address", "mtu", "memory", "pids_limit", "/x",
          "198.18.0.1/24", "..", "a=b", "\x00", "é", "0:0"]
_semi = st.recursive(
    st.sampled_from(_NAMES) | st.integers(-5, 70000) | st.booleans() | st.none(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(_NAMES), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_json, st.dictionaries(st.sampled_from(_FIELDS), _json | _semi, max_size=6)))
def test_fuzz_only_config_or_config_error(data: Any) -> None:
    try:
        cfg = parse(data)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert "NEWNS" in cfg.namespaces


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FIELDS), _semi, min_size=1, max_size=4))
def test_fuzz_cli_never_tracebacks(tmp_path: Path, data: dict[str, Any]) -> None:
    root = tmp_path / "fz"
    root.mkdir(exist_ok=True)
    try:
        parse(data)
        return  # a valid config would make a container: the other tests cover that
    except ConfigError:
        pass
    (root / "container.json").write_text(json.dumps(data))
    r = nsinit(root, "exec", "/bin/true")
    assert r.returncode == 125
    assert r.stderr.startswith("nsinit: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in root.iterdir()) == ["container.json"]
