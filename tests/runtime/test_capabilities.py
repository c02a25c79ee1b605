"""nsruntime.capabilities: each test drops capabilities in a forked child and reads what the kernel
reports (/proc/self/status) or what it refuses (mknod, chown)."""

from __future__ import annotations

import json
import os
import select
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from nsruntime import capabilities, libc
from nsruntime.config import parse
from nsruntime.errors import ConfigError

ROOT = os.geteuid() == 0
CAP = {name: i for i, name in enumerate(capabilities.NAMES)}
SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def in_child(fn: Callable[[], object], timeout: float = 10.0) -> object:
    """Run fn in a forked child; return what it returned (JSON), or raise what it raised (as text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(r)
            out = json.dumps({"ok": fn()})
        except BaseException as e:
            out, code = json.dumps({"error": f"{type(e).__name__}: {e}"}), 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                os.kill(pid, 9)
                raise AssertionError(f"child silent for {timeout} s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks))
    if "error" in res:
        raise AssertionError(f"in the child: {res['error']}")
    return res["ok"]


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in SETS:
                out[key] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                out[key] = int(value.strip())
    return out


def bits(*names: str) -> int:
    m = 0
    for n in names:
        m |= 1 << CAP[n]
    return m


# ------------------------------------------------------------------ names (no privilege)


@pytest.mark.parametrize("name", ["CAP_SYS_ADMIN", "SYS_ADMIN", "sys_admin", "cap_sys_admin"])
def test_number_accepts_the_kernels_names_with_or_without_prefix(name: str) -> None:
    assert capabilities.number(name) == 21


def test_number_refuses_unknown_names_and_ones_past_cap_last_cap() -> None:
    assert capabilities.number("NOT_A_CAP") is None
    last = capabilities.last_cap()
    if last + 1 < len(capabilities.NAMES):
        assert capabilities.number(capabilities.NAMES[last + 1]) is None
    assert capabilities.number(capabilities.NAMES[last]) == last


def test_an_unknown_capability_in_the_config_is_an_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"capabilities_mask\[1\]: unknown capability \"CAP_NOPE\""):
        parse({"capabilities_mask": ["MKNOD", "CAP_NOPE"]})
    assert parse({"capabilities_mask": ["cap_mknod", "NET_RAW"]}).capabilities_mask == {CAP["MKNOD"], CAP["NET_RAW"]}


def test_names_of_numbers() -> None:
    assert capabilities.names({CAP["MKNOD"], CAP["CHOWN"]}) == ["CAP_CHOWN", "CAP_MKNOD"]


# ------------------------------------------------------------------ the kernel


@pytest.mark.privileged
@pytest.mark.skipif(not ROOT, reason="needs root")
class TestDrop:
    def test_drop_removes_from_every_set_and_keeps_the_others(self) -> None:
        net_raw = CAP["NET_RAW"]

        def child() -> dict[str, int]:
            # give the child an ambient capability first, so the ambient set is shown to lose it too
            eff, prm, inh = libc.capget()
            libc.capset(eff, prm, inh | bits("NET_RAW", "KILL"))
            libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_RAISE, net_raw)
            libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_RAISE, CAP["KILL"])
            before = status()
            assert before["CapAmb"] & bits("NET_RAW"), before
            capabilities.drop(frozenset({CAP["CHOWN"], CAP["MKNOD"], net_raw}))
            return status()

        before = status()
        after = in_child(child)
        assert isinstance(after, dict)
        dropped = bits("CHOWN", "MKNOD", "NET_RAW")
        for s in SETS:
            assert after[s] & dropped == 0, s
        for s in ("CapBnd", "CapEff", "CapPrm"):
            assert after[s] == before[s] & ~dropped, s
        assert after["CapAmb"] == bits("KILL") and after["CapInh"] == bits("KILL")

    def test_setpcap_itself_can_be_dropped(self) -> None:
        def child() -> dict[str, int]:
            capabilities.drop(frozenset({CAP["SETPCAP"], CAP["SYS_ADMIN"], CAP["MKNOD"]}))
            return status()

        after = in_child(child)
        assert isinstance(after, dict)
        for s in ("CapBnd", "CapEff", "CapPrm"):
            assert after[s] & bits("SETPCAP", "SYS_ADMIN", "MKNOD") == 0, s
            assert after[s] & bits("CHOWN", "KILL"), s

    def test_dropped_capabilities_stay_gone_after_execve_as_root(self) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                capabilities.drop(frozenset({CAP["MKNOD"], CAP["SYS_ADMIN"]}))
                capabilities.set_no_new_privs()
                os.dup2(w, 1)
                os.execv("/bin/cat", ["cat", "/proc/self/status"])
            finally:
                os._exit(127)
        os.close(w)
        with os.fdopen(r) as f:
            text = f.read()
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        for s in ("CapBnd", "CapEff", "CapPrm"):
            v = int(lines[s].strip(), 16)
            assert v & bits("MKNOD", "SYS_ADMIN") == 0 and v & bits("CHOWN"), s
        assert lines["NoNewPrivs"].strip() == "1"

    def test_no_new_privs(self) -> None:
        def child() -> list[int]:
            first = status()["NoNewPrivs"]
            capabilities.set_no_new_privs()
            return [first, status()["NoNewPrivs"], libc.prctl(libc.PR_GET_NO_NEW_PRIVS)]

        assert in_child(child) == [0, 1, 1]

    def test_dropping_nothing_changes_nothing(self) -> None:
        def child() -> dict[str, int]:
            capabilities.drop(frozenset())
            return status()

        assert in_child(child) == {k: v for k, v in status().items()}

    def test_mknod_fails_without_mknod(self, tmp_path: Path) -> None:
        def make(name: str, drop: set[str]) -> int:
            capabilities.drop(frozenset(CAP[n] for n in drop))
            try:
                os.mknod(tmp_path / name, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError as e:
                return e.errno or -1
            return 0

        assert in_child(lambda: make("with", set())) == 0
        assert stat.S_ISCHR((tmp_path / "with").stat().st_mode)
        assert in_child(lambda: make("without", {"MKNOD"})) == 1  # EPERM
        assert not (tmp_path / "without").exists()

    def test_chown_fails_without_chown(self, tmp_path: Path) -> None:
        f = tmp_path / "file"
        f.write_text("x")

        def give(drop: set[str]) -> int:
            capabilities.drop(frozenset(CAP[n] for n in drop))
            try:
                os.chown(f, 1000, 1000)
            except OSError as e:
                return e.errno or -1
            return 0

        assert in_child(lambda: give({"CHOWN"})) == 1  # EPERM
        assert f.stat().st_uid == 0
        assert in_child(lambda: give(set())) == 0
        assert f.stat().st_uid == 1000
