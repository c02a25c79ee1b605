"""No way out: descriptors, working directory, symlinked mount destinations, masked paths, user ns."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.conftest import live_pid, nsinit, nsinit_bg, wait_for, write_config

pytestmark = pytest.mark.privileged


def test_no_runtime_descriptor_reaches_the_command(busybox_rootfs: Path) -> None:
    # a fd of the caller that isn't close-on-exec must not cross into the container either
    r_fd, w_fd = os.pipe()
    os.set_inheritable(w_fd, True)
    try:
        r = nsinit(busybox_rootfs, "exec", "ls", "-l", "/proc/self/fd", pass_fds=(w_fd,))
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert r.returncode == 0, r.stderr
    fds = {line.split()[-3]: line.split()[-1] for line in r.stdout.splitlines() if "->" in line}
    extra = {fd: target for fd, target in fds.items() if fd not in ("0", "1", "2")}
    # ls itself holds one descriptor: the directory it is listing
    assert list(extra.values()) in ([], [f"/proc/{target.split('/')[2]}/fd" for target in extra.values()]), fds
    assert len(extra) <= 1


def test_working_directory_is_inside_the_root(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "ls", "-l", "/proc/self/cwd", "/proc/self/root")
    assert r.returncode == 0, r.stderr
    assert [line.split()[-1] for line in r.stdout.splitlines()] == ["/", "/"]


def test_pid1_cannot_be_ptraced_or_opened(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, user="1000:1000")
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "ls /proc/1/fd 2>&1; cat /proc/1/environ 2>&1")
    assert "Permission denied" in r.stdout


@pytest.mark.parametrize("how", ["symlink", "dotdot"])
def test_mount_destination_cannot_escape_the_rootfs(busybox_rootfs: Path, tmp_path: Path, how: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "payload").write_text("inside")
    target = Path("/tmp") / f"nsinit-escape-{uuid.uuid4().hex[:8]}"
    assert not target.exists()
    if how == "symlink":
        (busybox_rootfs / "evil").symlink_to(target)  # absolute: on the host it points at /tmp/...
        dest = "/evil/sub"
    else:
        dest = f"/../../../../..{target}/sub"
    write_config(busybox_rootfs, mounts=[{"source": str(src), "destination": dest}])
    try:
        r = nsinit(busybox_rootfs, "exec", "cat", f"{target}/sub/payload")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "inside"
        # it landed inside the rootfs, and the host's /tmp never saw it
        assert not target.exists()
        assert (busybox_rootfs / str(target).lstrip("/") / "sub").is_dir()
    finally:
        if target.exists():
            os.system(f"umount -l {target}/sub 2>/dev/null; rm -rf {target}")


def test_masked_and_readonly_paths(busybox_rootfs: Path) -> None:
    script = (
        "for f in /proc/keys /proc/timer_list /proc/sched_debug /proc/kcore; do "
        "[ -e $f ] && echo $f=$(wc -c < $f); done; "
        "echo firmware=$(ls -A /sys/firmware | wc -l); echo acpi=$(ls -A /proc/acpi 2>/dev/null | wc -l); "
        "echo 1 > /proc/sys/kernel/domainname 2>/dev/null || echo sys-ro; "
        "[ -e /proc/sysrq-trigger ] && { echo h > /proc/sysrq-trigger 2>/dev/null || echo sysrq-ro; }; "
        "grep -E ' /proc/(irq|bus|sys) ' /proc/self/mountinfo | grep -c ' ro,'"
    )
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split()
    for item in out:
        if item.startswith("/proc/"):
            assert item.endswith("=0"), out
    assert "/proc/keys=0" in out and "firmware=0" in out and "acpi=0" in out
    assert "sys-ro" in out
    assert out[-1] == "3"
    host_keys = Path("/proc/keys").read_text()
    assert host_keys  # the host does have keys to hide


def test_user_namespace_root_inside_is_unprivileged_outside(busybox_rootfs: Path) -> None:
    # root inside is uid 200000 on the host: it must be able to walk to its rootfs
    for parent in list(busybox_rootfs.parents)[:4]:
        if str(parent).startswith("/tmp/"):
            parent.chmod(0o755)
    write_config(busybox_rootfs, namespaces=["NEWUSER", "NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWNET"],
                 uid_mappings=[{"container_id": 0, "host_id": 200000, "size": 65536}],
                 gid_mappings=[{"container_id": 0, "host_id": 200000, "size": 65536}])
    p = nsinit_bg(busybox_rootfs, "exec", "sh", "-c", "id -u; cat /proc/self/uid_map; sleep 30")
    try:
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.readline().strip() == "0", p.stderr.read()
        assert p.stdout.readline().split() == ["0", "200000", "65536"]
        pid = wait_for(lambda: live_pid(busybox_rootfs), what="pid file")
        children = wait_for(lambda: Path(f"/proc/{pid}/task/{pid}/children").read_text().split(),
                            what="the command under PID 1")
        status = Path(f"/proc/{children[0]}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["200000"] * 4
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)
    assert p.returncode == 143


def test_user_namespace_needs_mappings(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, namespaces=["NEWUSER", "NEWNS"])
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125 and "uid_mappings: required with NEWUSER" in r.stderr


def test_a_mount_point_made_meanwhile_by_another_container_is_taken(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers sharing a rootfs make its missing mount points side by side: a component that
    appears between our look and our mkdir (EEXIST) is looked at again, not an error."""
    from nsruntime import rootfs

    root = tmp_path / "r"
    (root / "proc").mkdir(parents=True)  # made by the other container just after our readlink
    real = os.readlink
    raced: list[str] = []

    def readlink(path: str, *, dir_fd: int | None = None) -> str:
        if path == "proc" and not raced:
            raced.append(path)
            raise FileNotFoundError(path)
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(rootfs.os, "readlink", readlink)
    fd = rootfs.resolve_in_root(str(root), "/proc/sub", make="dir")
    try:
        assert raced and os.readlink(f"/proc/self/fd/{fd}") == str(root / "proc" / "sub")
    finally:
        os.close(fd)
