"""The Python API the supervisor uses: create/start apart, many containers from one process,
signals, exit statuses, bounded teardown of a container that can't be killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nsruntime
from nsruntime import TeardownError
from tests.conftest import make_busybox_rootfs

pytestmark = pytest.mark.privileged


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_busybox_rootfs(tmp_path / "bb")


def _create(rootfs: Path, state: Path, *cmd: str, stdio: tuple[int, int, int] | None = None) -> nsruntime.Container:
    cfg = nsruntime.load_config(rootfs / "container.json")
    state.mkdir(parents=True, exist_ok=True)
    return nsruntime.create(cfg, rootfs, list(cmd), state, die_with_parent=False,
                            stdio=stdio or (0, 1, 2))


def test_create_then_start_are_two_steps(rootfs: Path, tmp_path: Path) -> None:
    r, w = os.pipe()
    c = _create(rootfs, tmp_path / "s", "sh", "-c", "echo started", stdio=(0, w, 2))
    os.close(w)
    try:
        assert (tmp_path / "s" / "pid").read_text().strip() == str(c.pid)
        time.sleep(0.3)
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 100)  # created, not started: the command hasn't run
        assert c.poll() is None
        c.start()
        st = c.wait(10)
        assert st == nsruntime.ExitStatus(0, None, False)
        os.set_blocking(r, True)
        assert os.read(r, 100) == b"started\n"
    finally:
        os.close(r)
        released = c.destroy()
    assert released["files"] and all(not Path(f).exists() for f in released["files"])
    assert released["cgroups"] and all(not Path(d).exists() for d in released["cgroups"])


def test_many_containers_from_one_process(rootfs: Path, tmp_path: Path) -> None:
    cs = [_create(rootfs, tmp_path / f"s{i}", "sleep", "60") for i in range(10)]
    try:
        for c in cs:
            c.start()
        assert len({os.readlink(f"/proc/{c.pid}/ns/pid") for c in cs}) == 10
        for c in cs:
            c.signal(signal.SIGTERM)
        for c in cs:
            st = c.wait(10)
            assert st is not None and st.exit_code == 143 and st.signal == signal.SIGTERM
            assert st.signal_name == "SIGTERM"
    finally:
        for c in cs:
            c.destroy()


def test_killed_pid1_is_reported_with_its_signal(rootfs: Path, tmp_path: Path) -> None:
    c = _create(rootfs, tmp_path / "s", "sleep", "60")
    try:
        c.start()
        os.kill(c.pid, signal.SIGKILL)
        st = c.wait(10)
        assert st == nsruntime.ExitStatus(137, signal.SIGKILL, False)
    finally:
        c.destroy()


def test_abandoned_before_start(rootfs: Path, tmp_path: Path) -> None:
    c = _create(rootfs, tmp_path / "s", "sleep", "60")
    c.destroy()
    assert not (tmp_path / "s" / "pid").exists()
    assert not os.path.exists(f"/proc/{c.pid}")


def test_teardown_of_a_frozen_container_is_bounded_and_named(rootfs: Path, tmp_path: Path) -> None:
    c = _create(rootfs, tmp_path / "s", "sleep", "60")
    freezer = next((p for p in c.cgroups.paths if "/freezer/" in p), None) if c.cgroups else None
    if freezer is None:
        c.destroy()
        pytest.skip("no v1 freezer hierarchy here")
    c.start()
    Path(freezer, "freezer.state").write_text("FROZEN")
    try:
        t0 = time.monotonic()
        with pytest.raises(TeardownError) as e:
            c.destroy(timeout=1.0)
        assert time.monotonic() - t0 < 3.5
        msg = str(e.value)
        assert f"pid {c.pid}" in msg and "after SIGKILL" in msg
        assert (tmp_path / "s" / "pid").exists()  # still recorded: somebody must finish this
    finally:
        Path(freezer, "freezer.state").write_text("THAWED")
    released = c.destroy(timeout=5.0)
    assert released["cgroups"]
    assert not (tmp_path / "s" / "pid").exists()


def test_a_second_create_in_a_live_state_dir_is_refused(rootfs: Path, tmp_path: Path) -> None:
    c = _create(rootfs, tmp_path / "s", "sleep", "60")
    try:
        with pytest.raises(nsruntime.StateError, match="already running"):
            _create(rootfs, tmp_path / "s", "true")
    finally:
        c.destroy()


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


def test_zygote_forks_containers_that_share_its_pages(rootfs: Path, tmp_path: Path) -> None:
    from nsruntime.zygote import Zygote

    ballast = [{"i": i, "s": str(i)} for i in range(300_000)]  # make this caller big, like a daemon
    z = Zygote.start()
    cfg = nsruntime.load_config(rootfs / "container.json")
    direct: list[nsruntime.Container] = []
    forked: list[nsruntime.Container] = []
    try:
        for i in range(8):
            (tmp_path / f"s{i}").mkdir()
            c = nsruntime.create(cfg, rootfs, ["sleep", "60"], tmp_path / f"s{i}", die_with_parent=False,
                                 stdio=(0, 1, 2), zygote=z if i % 2 else None)
            (forked if i % 2 else direct).append(c)
            c.start()
        # PID 1 is the caller's child (reparented to this subreaper), not the zygote's
        for c in forked:
            ppid = int(Path(f"/proc/{c.pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            assert ppid == os.getpid()
        ballast = [{"i": i, "s": str(i)} for i in range(300_000)]  # the caller keeps writing its pages
        pss_direct = sorted(_pss_kib(c.pid) for c in direct)[2]
        pss_forked = sorted(_pss_kib(c.pid) for c in forked)[2]
        assert pss_forked * 1.5 < pss_direct, (pss_forked, pss_direct)
        assert len(ballast) == 300_000
        forked[0].signal(signal.SIGTERM)
        st = forked[0].wait(10)
        assert st is not None and st.exit_code == 143
    finally:
        for c in direct + forked:
            c.destroy()
        z.close()
    assert not os.path.exists(f"/proc/{z.pid}")


def test_zygote_ends_a_bad_request_with_eof_and_keeps_serving(rootfs: Path, tmp_path: Path) -> None:
    import socket

    from nsruntime.zygote import Zygote

    z = Zygote.start()
    try:
        mine, theirs = socket.socketpair()
        with mine:
            z.spawn({}, {}, [theirs.fileno(), 1, 2])  # three descriptors where four are due
            theirs.close()
            mine.settimeout(10)
            assert mine.recv(64) == b""  # the zygote closed what it got: the creator's wait ends
        cfg = nsruntime.load_config(rootfs / "container.json")
        (tmp_path / "s").mkdir()
        c = nsruntime.create(cfg, rootfs, ["true"], tmp_path / "s", die_with_parent=False, stdio=(0, 1, 2),
                             zygote=z)
        c.start()
        assert c.wait(10) == nsruntime.ExitStatus(0, None, False)
        c.destroy()
    finally:
        z.close()


def _planned_cgroups(state: Path) -> list[str]:
    import json

    return list(json.loads((state / "state.json").read_text())["cgroups"])


def _lock_free(d: Path) -> bool:
    import fcntl

    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_begin_create_driven_by_hand_then_aborted_leaves_nothing(rootfs: Path, tmp_path: Path) -> None:
    import select

    cfg = nsruntime.load_config(rootfs / "container.json")
    state = tmp_path / "s"
    state.mkdir()
    making = nsruntime.begin_create(cfg, rootfs, ["sleep", "60"], state, die_with_parent=False, stdio=(0, 1, 2))
    planned = _planned_cgroups(state)
    assert planned and all(Path(p).is_dir() for p in planned)  # recorded, then made
    assert making.pid > 0 and os.path.exists(f"/proc/{making.pid}")
    assert not (state / "pid").exists()  # no pid file before PID 1 says it is ready
    assert not _lock_free(state)  # the state dir stays locked while it is on its way
    pid = making.pid
    making.abort()
    making.abort()  # idempotent
    assert _lock_free(state)
    assert not os.path.exists(f"/proc/{pid}")
    leaves = [p for p in planned if not any(q.startswith(p + "/") for q in planned)]  # parents are shared
    assert leaves and not any(Path(p).exists() for p in leaves)
    assert not (state / "pid").exists()
    # the state dir is free again: a full create by hand, step by step
    making = nsruntime.begin_create(cfg, rootfs, ["true"], state, die_with_parent=False, stdio=(0, 1, 2))
    c = None
    deadline = time.monotonic() + 10
    while c is None:
        assert time.monotonic() < deadline
        select.select([making.fd], [], [], 0.5)
        c = making.step()
    c.start()
    assert c.wait(10) == nsruntime.ExitStatus(0, None, False)
    c.destroy()


def test_one_zygote_brings_up_several_containers_at_once(rootfs: Path, tmp_path: Path) -> None:
    import select

    from nsruntime.zygote import Zygote

    cfg = nsruntime.load_config(rootfs / "container.json")
    z = Zygote.start()
    made: list[nsruntime.Container] = []
    pending: list[nsruntime.Creating] = []
    try:
        for i in range(6):
            (tmp_path / f"s{i}").mkdir()
            pending.append(nsruntime.begin_create(cfg, rootfs, ["sleep", "60"], tmp_path / f"s{i}",
                                                  die_with_parent=False, stdio=(0, 1, 2), zygote=z))
        deadline = time.monotonic() + 20
        while pending:
            assert time.monotonic() < deadline
            ready, _, _ = select.select([m.fd for m in pending], [], [], 0.5)
            for m in [m for m in pending if m.fd in ready]:
                c = m.step()
                if c is not None:
                    pending.remove(m)
                    made.append(c)
        assert len({os.readlink(f"/proc/{c.pid}/ns/pid") for c in made}) == 6
        for i in range(6):
            assert (tmp_path / f"s{i}" / "pid").exists()
    finally:
        for m in pending:  # a failure half-way: nothing may stay behind
            m.abort()
        for c in made:
            c.destroy()
        z.close()
    assert not os.path.exists(f"/proc/{z.pid}")


@pytest.mark.parametrize("via_zygote", [False, True])
def test_pid1_root_and_cwd_are_the_containers_and_it_holds_no_host_fd(rootfs: Path, tmp_path: Path,
                                                                       via_zygote: bool) -> None:
    """PID 1 leaves the setup to the command's process: pivot_root must still have taken PID 1's
    root and working directory along (else it pins the host's tree), and PID 1 keeps only its
    socket, signalfd and the command's stdio."""
    from nsruntime.zygote import Zygote

    z = Zygote.start() if via_zygote else None
    cfg = nsruntime.load_config(rootfs / "container.json")
    (tmp_path / "s").mkdir()
    try:
        c = nsruntime.create(cfg, rootfs, ["sleep", "60"], tmp_path / "s", die_with_parent=False, stdio=(0, 1, 2),
                             zygote=z)
        try:
            c.start()
            root = os.readlink(f"/proc/{c.pid}/root")
            assert root == os.readlink(f"/proc/{c.pid}/cwd")
            assert root in (str(rootfs), "/"), root
            fds = sorted(int(f) for f in os.listdir(f"/proc/{c.pid}/fd"))
            assert fds[:3] == [0, 1, 2] and len(fds) == 5, [os.readlink(f"/proc/{c.pid}/fd/{f}") for f in fds]
            if via_zygote:  # made with CLONE_PARENT: our child, not the zygote's
                assert int(Path(f"/proc/{c.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid()
        finally:
            c.destroy()
    finally:
        if z is not None:
            z.close()


def test_a_stopped_zygote_fails_the_create_within_its_timeout(rootfs: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket buffer holds some tens of requests; past that a stuck zygote must fail the
    create, not hang the caller (nsinitd's event loop) for good."""
    from nsruntime.zygote import Zygote

    monkeypatch.setattr(Zygote, "TIMEOUT", 0.5)
    z = Zygote.start()
    cfg = nsruntime.load_config(rootfs / "container.json")
    pending: list[nsruntime.Creating] = []
    os.kill(z.pid, signal.SIGSTOP)
    try:
        with pytest.raises(nsruntime.SetupError, match=r"did not take the request within 0\.5 s"):
            for i in range(300):
                (tmp_path / f"s{i}").mkdir()
                t0 = time.monotonic()
                pending.append(nsruntime.begin_create(cfg, rootfs, ["true"], tmp_path / f"s{i}",
                                                      die_with_parent=False, stdio=(0, 1, 2), zygote=z))
        assert time.monotonic() - t0 < 3
        assert 5 <= len(pending) < 300
        failed = tmp_path / f"s{len(pending)}"
        assert not (failed / "pid").exists() and not (failed / "state.json").exists()  # nothing half-made
    finally:
        for m in pending:
            m.abort()
        os.kill(z.pid, signal.SIGCONT)
        z.close()
    assert not os.path.exists(f"/proc/{z.pid}")


def _imported(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    # -S: no site, so no .pth file (an editable install's finder imports re, typing...) hides ours
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-S", "-X", "importtime", *argv], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=60)
    return p, {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}


def test_the_nsinit_launcher_runs_a_container_without_the_heavy_modules(rootfs: Path) -> None:
    """bin/nsinit (installed as a script, not a pip-generated wrapper) and the exec path import
    neither re nor ctypes/__init__ nor dataclasses, typing, json, zlib, the terminal module, or seccomp
    (libseccomp is for a container.json with a profile only)."""
    _, startup = _imported(["-c", "pass"], rootfs)  # what the interpreter's own start brings
    p, mods = _imported([str(Path(__file__).resolve().parents[2] / "bin" / "nsinit"), "exec", "/bin/true"], rootfs)
    assert p.returncode == 0, p.stderr[-800:]
    assert {"nsruntime.container", "nsruntime.libc", "_ctypes"} <= mods
    heavy = {"re", "ctypes", "enum", "dataclasses", "typing", "json", "zlib", "termios", "nsruntime.console",
             "nsruntime.seccomp"}
    assert not (mods - startup) & heavy, sorted((mods - startup) & heavy)


def test_create_with_start_runs_the_command_at_once_and_keeps_its_exit_message(rootfs: Path, tmp_path: Path) -> None:
    """start=True (nsinit exec): "start" goes with "go". The command may be over before the
    creator has read "ready": what PID 1 said after it (its exit message, with the signal) is kept."""
    cfg = nsruntime.load_config(rootfs / "container.json")
    r, w = os.pipe()
    (tmp_path / "s").mkdir()
    c = nsruntime.create(cfg, rootfs, ["sh", "-c", "echo started; kill -TERM $$"], tmp_path / "s",
                         die_with_parent=False, stdio=(0, w, 2), start=True)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as out:
            assert out.readline() == b"started\n"  # no start() called
        c.start()  # a no-op now
        assert c.wait(10) == nsruntime.ExitStatus(143, signal.SIGTERM, False)
    finally:
        c.destroy()
    # the creator slow to read: "ready" and the exit message come in one read
    making = nsruntime.begin_create(cfg, rootfs, ["sh", "-c", "kill -KILL $$"], tmp_path / "s",
                                    die_with_parent=False, stdio=(0, 1, 2), start=True)
    c = None
    try:
        time.sleep(0.5)  # set up, run, killed, PID 1 gone: everything it says is waiting
        c = making.step()
        assert c is not None
        st = c.wait(10)
        assert st == nsruntime.ExitStatus(137, signal.SIGKILL, False), st
    finally:
        making.abort()
        if c is not None:
            c.destroy()
