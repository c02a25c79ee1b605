"""nsinit exec: what the container sees, the exit statuses, signals, pid files, join, tty.

Real kernel, no mocks: each test makes a container from a busybox (or host) rootfs and asserts
what a probe inside reports and what the host keeps afterwards (checked by conftest too).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from tests.conftest import NSINIT, REPO, live_pid, nsinit, nsinit_bg, records, wait_for, write_config

pytestmark = pytest.mark.privileged


def test_hostname_pid_and_init(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "hostname; echo $$; cat /proc/1/comm; cat /proc/1/cmdline")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "koye"
    assert lines[1] == "2"  # PID 1 is our init, the command its first child
    assert lines[2] == "nsinit-init"
    assert "nsruntime.cli" in lines[3]


def test_environment_replaces_callers(busybox_rootfs: Path) -> None:
    env = {**os.environ, "LEAKED_SECRET": "x", "PYTHONPATH": str(REPO)}
    r = subprocess.run([*NSINIT, "exec", "env"], cwd=busybox_rootfs, capture_output=True, text=True, timeout=30,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "LEAKED_SECRET" not in r.stdout
    assert sorted(r.stdout.split()) == sorted(["HOME=/root", "PATH=/bin", "TERM=xterm", "PWD=/", "SHLVL=1"]) or (
        "HOME=/root" in r.stdout and "TERM=xterm" in r.stdout
    )


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "kill -9 $$"], 137),
        (["sh", "-c", "kill -TERM $$"], 143),
        (["/proc"], 126),
        (["/etc/passwd"], 126),
        (["/no/such/command"], 127),
        (["no-such-command"], 127),
    ],
)
def test_exit_status(busybox_rootfs: Path, cmd: list[str], code: int) -> None:
    r = nsinit(busybox_rootfs, "exec", *cmd)
    assert r.returncode == code, r.stderr
    if code in (126, 127):
        assert r.stderr.count("\n") == 1 and cmd[0] in r.stderr


def test_mounts_seen_inside(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "cat", "/proc/self/mountinfo")
    assert r.returncode == 0, r.stderr
    mounts = {line.split()[4]: line for line in r.stdout.splitlines()}
    assert "/" in mounts
    assert " - proc " in mounts["/proc"]
    assert " - sysfs " in mounts["/sys"] and " ro," in mounts["/sys"].split(" - ")[0] + ","
    assert " - devpts " in mounts["/dev/pts"] and "ptmxmode=666" in mounts["/dev/pts"]
    assert " - tmpfs " in mounts["/dev/shm"] and " - mqueue " in mounts["/dev/mqueue"]
    # nothing of the host's mount table shows through
    assert "/sys/fs/cgroup" not in mounts and not any(m.startswith("/work") for m in mounts)
    assert {m for m in mounts if not m.startswith(("/dev/", "/proc/", "/sys/"))} == {
        "/", "/proc", "/sys", "/dev", "/container.json"}
    assert " ro," in mounts["/container.json"].split(" - ")[0] + ","  # the config of the next run


@pytest.mark.parametrize("dest", ["/proc/sys/kernel", "/dev/extra", "/sys/kernel"])
def test_a_mount_below_proc_dev_or_sys_is_on_top_of_it_not_hidden_below(busybox_rootfs: Path, dest: str) -> None:
    write_config(busybox_rootfs, mounts=[{"type": "tmpfs", "destination": dest}])
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", f"touch {dest}/mine && ls {dest}; stat -f -c %T {dest}")
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "mine\ntmpfs\n")
    # nothing made in the rootfs's own directory underneath
    assert not (busybox_rootfs / dest.lstrip("/")).exists()


def test_dev_is_minimal(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "ls /dev; echo x > /dev/null; head -c 4 /dev/zero | wc -c;"
               "readlink /dev/ptmx")
    assert r.returncode == 0, r.stderr
    names = set(r.stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue"} <= names
    assert "sda" not in names and "vda" not in names and "mem" not in names
    assert "pts/ptmx" in r.stdout


def test_loopback_up_with_newnet(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "cat /sys/class/net/lo/operstate; ls /sys/class/net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["unknown", "lo"]  # lo reports "unknown" when up
    r = nsinit(busybox_rootfs, "exec", "ping", "-c", "1", "-W", "2", "127.0.0.1")
    assert r.returncode == 0, r.stdout + r.stderr


def test_orphans_are_reaped(busybox_rootfs: Path) -> None:
    # each subshell forks a child and exits: the children are orphaned to PID 1 and must not stay zombies
    script = "for i in 1 2 3 4 5; do (sleep 0.1 & ) ; done; sleep 0.6; cat /proc/[0-9]*/stat"
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    states = [line[line.rindex(")") + 2] for line in r.stdout.splitlines() if ")" in line]
    assert "Z" not in states, r.stdout


def _start_long(root: Path, script: str) -> subprocess.Popen[str]:
    p = nsinit_bg(root, "exec", "sh", "-c", script)
    wait_for(lambda: live_pid(root), what="pid file")
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_signals_forwarded_to_command(busybox_rootfs: Path, sig: signal.Signals) -> None:
    name = sig.name[3:]
    p = _start_long(busybox_rootfs, f'trap "echo got {name}; exit 42" {name}; echo ready; '
                    "while :; do sleep 0.05; done")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 42, err
    assert f"got {name}" in out


def test_pid_files_while_alive_and_gone_after(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "echo ready; sleep 30")
    pid = int((busybox_rootfs / "pid").read_text())
    rec = records(busybox_rootfs)
    assert int((rec / "pid").read_text()) == pid
    start = int((rec / "start").read_text())
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    assert int(data[data.rindex(b")") + 2 :].split()[19]) == start
    assert (rec / "state.json").exists()
    assert os.stat(rec).st_mode & 0o777 == 0o700
    assert not (busybox_rootfs / "start").exists() and not (busybox_rootfs / "state.json").exists()
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    assert p.returncode == 143
    assert not (busybox_rootfs / "pid").exists()
    assert not rec.exists()


def test_root_option_keeps_state_elsewhere(busybox_rootfs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "container.json").write_text((busybox_rootfs / "container.json").read_text().replace("koye", "other"))
    (busybox_rootfs / "container.json").unlink()
    p = nsinit_bg(busybox_rootfs, "--root", str(state), "exec", "sh", "-c", "hostname; sleep 30")
    try:
        wait_for(lambda: live_pid(state), what="pid file in --root")
        assert not (busybox_rootfs / "pid").exists()
        assert p.stdout is not None and p.stdout.readline().strip() == "other"
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)
    assert not (state / "pid").exists()


def test_join_enters_the_same_namespaces(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "echo hi > /tmp/mark; sleep 30")
    try:
        pid = live_pid(busybox_rootfs)
        assert pid
        kinds = ["pid", "mnt", "uts", "ipc", "net"]
        r = nsinit(busybox_rootfs, "exec", "sh", "-c",
                   "for n in " + " ".join(kinds) + "; do readlink /proc/self/ns/$n; done; cat /tmp/mark; "
                   "hostname; echo $$; cat /proc/1/comm; pwd")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[: len(kinds)] == [os.readlink(f"/proc/{pid}/ns/{k}") for k in kinds]
        assert lines[len(kinds) :][:2] == ["hi", "koye"]
        assert int(lines[len(kinds) + 2]) > 2  # a pid of the container's namespace
        assert lines[len(kinds) + 3 :] == ["nsinit-init", "/"]
        # a join reports its command's own status
        assert nsinit(busybox_rootfs, "exec", "sh", "-c", "exit 9").returncode == 9
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def test_a_join_takes_the_recorded_config_not_the_container_json_beside_it(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "sleep 30")
    try:
        assert live_pid(busybox_rootfs)
        (busybox_rootfs / "container.json").write_text("{broken")  # edited for the next run, say
        r = nsinit(busybox_rootfs, "exec", "hostname")
        assert (r.returncode, r.stdout, r.stderr) == (0, "koye\n", "")
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def test_pid1_death_kills_everything_including_joined(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "sleep 300 & sleep 300")
    joined = nsinit_bg(busybox_rootfs, "exec", "sh", "-c", "echo in; sleep 300")
    assert joined.stdout is not None and joined.stdout.readline().strip() == "in"
    pid = live_pid(busybox_rootfs)
    assert pid
    os.kill(pid, signal.SIGKILL)
    p.communicate(timeout=10)
    assert p.returncode == 137
    joined.communicate(timeout=10)
    assert joined.returncode == 137
    assert not (busybox_rootfs / "pid").exists() and not records(busybox_rootfs).exists()


def test_stale_pid_file_is_replaced(busybox_rootfs: Path) -> None:
    # a pid that exists (ours) but with another start time, and a pid that doesn't exist at all
    rec = records(busybox_rootfs)
    for pid, start in ((os.getpid(), 1), (2**22 - 7, 5)):
        rec.mkdir(mode=0o700, parents=True)
        (rec / "pid").write_text(f"{pid}\n")
        (rec / "start").write_text(f"{start}\n")
        r = nsinit(busybox_rootfs, "exec", "sh", "-c", "cat /proc/1/comm")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "nsinit-init"
        assert not (busybox_rootfs / "pid").exists() and not rec.exists()


def test_nsinit_killed_takes_its_container_down(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "sleep 300")
    pid = live_pid(busybox_rootfs)
    assert pid
    p.kill()
    p.communicate(timeout=10)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="container PID 1 to die with nsinit")
    # the next exec finds the stale files, cleans them and makes a new container
    assert (busybox_rootfs / "pid").exists()
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 0, r.stderr
    assert not (busybox_rootfs / "pid").exists()


def test_config_error_leaves_nothing(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, namespaces=["NEWNS", "NEWUTS", "NEWIPC", "NEWPID", "NEWFOO"])
    before = set(os.listdir(busybox_rootfs))
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125
    assert r.stderr == 'nsinit: namespaces[4]: unknown namespace "NEWFOO"\n'
    assert set(os.listdir(busybox_rootfs)) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "malformed JSON"),
        ('{"tty": "yes"}', "tty: expected a boolean, got string"),
        ('{"hostnme": "x"}', "hostnme: unknown field"),
        ('{"mounts": [{"source": "rel", "destination": "/x"}]}', 'mounts[0].source: "rel" is not an absolute path'),
        ('{"cgroups": {"memory": -5}}', "cgroups.memory: -5 is below the 4194304 bytes (4 MiB) nsinit needs"),
        ('{"cgroups": {"memory": 4096}}', "cgroups.memory: 4096 is below the 4194304 bytes (4 MiB) nsinit needs"),
        ('{"cgroups": {"pids_limit": 1}}', "cgroups.pids_limit: 1 is too low: PID 1 and the command need 2"),
        ('{"capabilities_mask": ["CAP_NOPE"]}', 'capabilities_mask[0]: unknown capability "CAP_NOPE"'),
        ("[]", "expected an object, got list"),
    ],
)
def test_bad_config_is_one_line_125(busybox_rootfs: Path, content: str, message: str) -> None:
    (busybox_rootfs / "container.json").write_text(content)
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (busybox_rootfs / "pid").exists() and not (busybox_rootfs / "proc").exists()
    assert not records(busybox_rootfs).exists()


def test_missing_config(tmp_path: Path) -> None:
    r = nsinit(tmp_path, "exec", "true")
    assert r.returncode == 125
    assert "container.json: no such file" in r.stderr


def test_bind_mounts_readonly_writable_and_created(busybox_rootfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    rw = tmp_path / "rw"
    rw.mkdir()
    write_config(busybox_rootfs, mounts=[
        {"source": str(src), "destination": "/deep/new/ro"},
        {"source": str(rw), "destination": "/rw", "writable": True, "private": True},
    ])
    r = nsinit(busybox_rootfs, "exec", "sh", "-c",
               "cat /deep/new/ro/f; touch /deep/new/ro/x 2>/dev/null && echo wrote-ro; echo out > /rw/g")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["data"]
    assert (rw / "g").read_text() == "out\n"
    assert not (src / "x").exists()


def test_missing_bind_source_is_125_and_leaves_nothing(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, mounts=[{"source": "/no/such/dir", "destination": "/x"}])
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125
    assert "/no/such/dir" in r.stderr and r.stderr.count("\n") == 1
    assert not (busybox_rootfs / "pid").exists() and not records(busybox_rootfs).exists()


def test_user_and_working_dir(busybox_rootfs: Path) -> None:
    (busybox_rootfs / "home" / "alice").mkdir(parents=True)
    write_config(busybox_rootfs, user="alice", working_dir="/home/alice")
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "id -u; id -g; id -G; pwd; echo $HOME")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1000", "1000", "1000", "50", "/home/alice", "/root"]
    write_config(busybox_rootfs, user="123:456", working_dir="/")
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "id -u; id -g")
    assert r.stdout.split() == ["123", "456"]
    write_config(busybox_rootfs, user="nobody-here")
    r = nsinit(busybox_rootfs, "exec", "true")
    assert r.returncode == 125 and 'no user "nobody-here"' in r.stderr


def test_readonly_fs_and_no_pivot_root(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, readonly_fs=True)
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "touch /x 2>&1; echo ok > /dev/shm/y && cat /dev/shm/y")
    assert "Read-only file system" in r.stdout and "ok" in r.stdout
    assert not (busybox_rootfs / "x").exists()
    write_config(busybox_rootfs, readonly_fs=False, no_pivot_root=True)
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "ls /; cat /proc/1/comm")
    assert r.returncode == 0, r.stderr
    assert "container.json" in r.stdout.split() and "nsinit-init" in r.stdout


def test_host_rootfs_needs_nothing_downloaded(host_rootfs: Path) -> None:
    r = nsinit(host_rootfs, "exec", "/bin/sh", "-c", "hostname; touch /usr/x 2>&1; echo t > /tmp/t && cat /tmp/t;"
               f"{sys.executable if sys.executable.startswith('/usr') else 'python3'} -c 'print(6*7)'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "nsinit-host"
    assert "Read-only file system" in r.stdout
    assert "t" in r.stdout.split() and "42" in r.stdout.split()


def test_tty_is_interactive(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, tty=True)
    c = pexpect.spawn(NSINIT[0], [*NSINIT[1:], "exec", "/bin/sh"], cwd=str(busybox_rootfs), dimensions=(30, 100),
                      timeout=10, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        c.expect(r"# ")
        c.sendline("tty; stty size")
        c.expect(r"/dev/pts/0\s+30 100")
        c.setwinsize(40, 120)  # SIGWINCH reaches nsinit, which resizes the container's terminal
        time.sleep(0.2)
        c.sendline("stty size")
        c.expect(r"40 120")
        c.sendline("exit 3")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 3


def test_tty_without_terminal_relays_output(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, tty=True)
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", "tty; echo out", stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/dev/pts/0", "out"]


def test_terminal_restored_after_exit(busybox_rootfs: Path) -> None:
    write_config(busybox_rootfs, tty=True)
    script = (f"stty -g > before; {' '.join(NSINIT)} exec sh -c 'exit 5'; echo rc=$?; stty -g > after; "
              "cmp before after && echo same")
    c = pexpect.spawn("/bin/sh", ["-c", script], cwd=str(busybox_rootfs), timeout=15,
                      env={**os.environ, "PYTHONPATH": str(REPO)})
    c.expect(pexpect.EOF)
    c.close()
    out = c.before.decode()
    assert "rc=5" in out and "same" in out, out


def test_state_and_kill_verbs(busybox_rootfs: Path) -> None:
    import json

    r = nsinit(busybox_rootfs, "state")
    assert r.returncode == 1 and json.loads(r.stdout)["status"] == "absent"
    assert nsinit(busybox_rootfs, "kill").returncode == 1
    p = _start_long(busybox_rootfs, 'trap "exit 11" USR1; while :; do sleep 0.05; done')
    try:
        r = nsinit(busybox_rootfs, "state")
        st = json.loads(r.stdout)
        assert r.returncode == 0 and st["status"] == "running" and st["pid"] == live_pid(busybox_rootfs)
        assert st["bundle"] == str(busybox_rootfs.resolve())
        assert nsinit(busybox_rootfs, "kill", "USR1").returncode == 0
        p.communicate(timeout=10)
        assert p.returncode == 11
        assert nsinit(busybox_rootfs, "kill", "NOPE").returncode == 125
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)


def test_ctrl_c_reaches_the_command_once(busybox_rootfs: Path) -> None:
    # ^C goes to the terminal's whole foreground process group: nsinit gets it and forwards it once;
    # the container, in a session of its own, must not receive a second copy directly
    p = subprocess.Popen([*NSINIT, "exec", "sh", "-c", 'n=0; trap "n=\\$((n+1))" INT; echo ready; '
                          'sleep 1; echo n=$n'], cwd=busybox_rootfs, text=True, stdout=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=10)
    assert out.strip() == "n=1"


def test_delete_releases_what_a_killed_nsinit_left(busybox_rootfs: Path) -> None:
    import json

    p = _start_long(busybox_rootfs, "sleep 300")
    pid = live_pid(busybox_rootfs)
    assert pid
    state = json.loads((records(busybox_rootfs) / "state.json").read_text())
    cgroups = [d for d in state["cgroups"] if d.endswith("/" + state["id"])]  # the leaves, not the parents
    assert len(cgroups) >= 2 and all(os.path.isdir(d) for d in cgroups)
    r = nsinit(busybox_rootfs, "delete")
    assert r.returncode == 1 and "use delete --force" in r.stderr  # a live one needs --force
    p.kill()  # nsinit itself dies: its container goes with it, the host-side records stay
    p.communicate(timeout=10)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="PID 1 to die with nsinit")
    assert (busybox_rootfs / "pid").exists() and any(os.path.isdir(d) for d in cgroups)
    r = nsinit(busybox_rootfs, "delete")
    assert r.returncode == 0, r.stderr
    assert set(cgroups) <= set(json.loads(r.stdout)["cgroups"])
    assert not any(os.path.isdir(d) for d in cgroups)
    assert not (busybox_rootfs / "pid").exists() and not records(busybox_rootfs).exists()


def test_delete_force_kills_a_live_container(busybox_rootfs: Path) -> None:
    p = _start_long(busybox_rootfs, "sleep 300")
    r = nsinit(busybox_rootfs, "delete", "--force")
    assert r.returncode == 0, r.stderr
    p.communicate(timeout=10)
    assert p.returncode == 137
    assert not (busybox_rootfs / "pid").exists() and not records(busybox_rootfs).exists()
