"""nsrun exec, ps, pause and resume (issue 16), driven as conmon and containerd's shim drive runc: a
process per verb, the test being the child subreaper that reaps PID 1 and detached exec'd processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.oci.test_nsrun import Bundle

pytestmark = pytest.mark.privileged


def task_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def started(b: Bundle) -> int:
    pid = b.create()
    assert b.nsrun("start", "c1").returncode == 0
    wait_for(b.marker, what="the command to run after start")
    return pid


def test_exec_runs_in_the_containers_namespaces_and_root_and_its_status_propagates(bundle: Bundle) -> None:
    pid = started(bundle)
    p = bundle.nsrun("exec", "c1", "sh", "-c", "cat /tmp/marker; readlink /proc/self/ns/pid; exit 7")
    assert p.returncode == 7, p.stdout
    assert p.stdout == f"ran\n{os.readlink(f'/proc/{pid}/ns/pid')}\n"


def test_exec_takes_cwd_env_and_user(bundle: Bundle) -> None:
    started(bundle)
    p = bundle.nsrun("exec", "--cwd", "/tmp", "--env", "FOO=bar", "--user", "1000:1001", "c1",
                     "sh", "-c", 'echo "$(pwd) $FOO $(id -u):$(id -g) $PATH"')
    assert (p.returncode, p.stdout) == (0, "/tmp bar 1000:1001 /bin\n")


def test_exec_of_a_missing_command_exits_127(bundle: Bundle) -> None:
    started(bundle)
    p = bundle.nsrun("exec", "c1", "/no/such/command")
    assert p.returncode == 127
    assert p.stdout == 'nsinit: exec "/no/such/command": No such file or directory\n'


def test_exec_with_a_process_file(bundle: Bundle, tmp_path: Path) -> None:
    started(bundle)
    proc = {"args": ["sh", "-c", 'echo "$A $(pwd) $(id -u) $(grep CapEff /proc/self/status)"'],
            "env": ["A=1", "PATH=/bin"], "cwd": "/proc", "user": {"uid": 5, "gid": 5},
            "capabilities": {"bounding": ["CAP_KILL"], "effective": [], "permitted": []},
            "noNewPrivileges": True}
    (tmp_path / "process.json").write_text(json.dumps(proc))
    p = bundle.nsrun("exec", "--process", str(tmp_path / "process.json"), "c1")
    assert (p.returncode, p.stdout) == (0, "1 /proc 5 CapEff:\t0000000000000000\n")


def test_a_bad_process_file_names_its_json_path(bundle: Bundle, tmp_path: Path) -> None:
    started(bundle)
    (tmp_path / "process.json").write_text(json.dumps({"args": ["sh"]}))
    p = bundle.nsrun("exec", "--process", str(tmp_path / "process.json"), "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: process.cwd: missing\n")


def test_exec_into_a_created_container_runs_before_its_command(bundle: Bundle) -> None:
    bundle.create()
    p = bundle.nsrun("exec", "c1", "sh", "-c", "test -e /tmp/marker || echo not yet; hostname")
    assert (p.returncode, p.stdout) == (0, "not yet\nnsrun\n")
    assert bundle.state()["status"] == "created"


def test_exec_into_a_stopped_container_is_refused(bundle: Bundle) -> None:
    pid = started(bundle)
    assert bundle.nsrun("kill", "c1", "KILL").returncode == 0
    bundle.reap(pid)
    p = bundle.nsrun("exec", "c1", "true")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot exec in a container that is stopped\n")


def test_exec_detach_writes_the_pid_file_and_the_caller_reaps_the_process(bundle: Bundle) -> None:
    started(bundle)
    pidfile = bundle.dir / "exec.pid"
    p = bundle.nsrun("exec", "--detach", "--pid-file", str(pidfile), "c1", "sh", "-c", "read x < /dev/null; sleep 1000")
    assert (p.returncode, p.stdout) == (0, "")
    pid = int(pidfile.read_text())
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == os.getpid(), "the exec'd process is the subreaper's child once nsrun has exited"
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{bundle.pids[0]}/ns/pid")
    os.kill(pid, signal.SIGTERM)
    bundle.pids.append(pid)
    status = bundle.reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_ps_lists_the_host_pids_of_the_container(bundle: Bundle) -> None:
    pid = started(bundle)
    p = bundle.nsrun("ps", "--format", "json", "c1")
    assert p.returncode == 0
    pids = json.loads(p.stdout)
    assert pid in pids and len(pids) == 2, "PID 1 and its command (sleep)"
    table = bundle.nsrun("ps", "c1").stdout.splitlines()
    assert table[0] == "PID    CMD" and any(line.endswith("sleep 1000") for line in table[1:])


def test_pause_freezes_the_container_state_says_paused_and_resume_thaws(bundle: Bundle) -> None:
    started(bundle)
    assert bundle.nsrun("pause", "c1").returncode == 0
    assert bundle.state()["status"] == "paused"
    pids = json.loads(bundle.nsrun("ps", "--format", "json", "c1").stdout)
    assert [task_state(p) for p in pids] == ["D", "D"], "PID 1 and sleep frozen"
    p = bundle.nsrun("pause", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot pause a container that is paused\n")
    assert bundle.nsrun("resume", "c1").returncode == 0
    assert bundle.state()["status"] == "running"
    assert [task_state(p) for p in pids] == ["S", "S"], "PID 1 and sleep waiting again, thawed"
    p = bundle.nsrun("resume", "c1")
    assert (p.returncode, p.stdout) == (1, "nsrun: cannot resume a container that is running\n")


def test_a_paused_container_is_killed_by_sigkill(bundle: Bundle) -> None:
    pid = started(bundle)
    assert bundle.nsrun("pause", "c1").returncode == 0
    assert bundle.nsrun("kill", "c1", "KILL").returncode == 0
    status = bundle.reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert bundle.state()["status"] == "stopped"


def test_delete_force_of_a_paused_container(bundle: Bundle) -> None:
    pid = started(bundle)
    assert bundle.nsrun("pause", "c1").returncode == 0
    assert bundle.nsrun("delete", "--force", "c1").returncode == 0
    bundle.reap(pid)
    assert os.listdir(bundle.root) == []


def test_exec_sets_the_process_rlimits(bundle: Bundle, tmp_path: Path) -> None:
    started(bundle)
    proc = {"args": ["sh", "-c", "ulimit -n; ulimit -Hn"], "cwd": "/", "env": ["PATH=/bin"],
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}]}
    (tmp_path / "process.json").write_text(json.dumps(proc))
    p = bundle.nsrun("exec", "--process", str(tmp_path / "process.json"), "c1")
    assert (p.returncode, p.stdout) == (0, "100\n200\n")


def test_exec_tty_gives_the_process_a_terminal_of_the_containers_devpts(bundle: Bundle) -> None:
    started(bundle)
    p = bundle.nsrun("exec", "--tty", "c1", "sh", "-c", "tty; ls -1 /dev/pts")
    assert p.returncode == 0
    assert p.stdout.replace("\r\n", "\n") == "/dev/pts/0\n0\nptmx\n"


def test_exec_cap_additional_gids_and_no_new_privs(bundle: Bundle) -> None:
    started(bundle)
    script = "grep -E '^(CapBnd|CapEff|CapPrm|NoNewPrivs)' /proc/self/status; id -G"
    p = bundle.nsrun("exec", "--cap", "CAP_CHOWN", "-g", "7", "--additional-gids", "9", "--no-new-privs", "c1",
                     "sh", "-c", script)
    assert p.returncode == 0, p.stdout
    # the spec's: CAP_AUDIT_WRITE (29), CAP_KILL (5), CAP_NET_BIND_SERVICE (10); plus CAP_CHOWN (0)
    caps = f"{(1 << 29) | (1 << 5) | (1 << 10) | 1:016x}"
    assert p.stdout.splitlines() == [f"CapPrm:\t{caps}", f"CapEff:\t{caps}", f"CapBnd:\t{caps}", "NoNewPrivs:\t1",
                                     "0 7 9"]


def test_exec_refuses_an_apparmor_profile_where_apparmor_is_absent(bundle: Bundle) -> None:
    started(bundle)
    p = bundle.nsrun("exec", "--apparmor", "myprofile", "c1", "true")
    assert p.returncode == 1
    assert p.stdout.startswith('nsrun: apparmor: profile "myprofile" asked for, but AppArmor is not enabled on this '
                               "kernel"), p.stdout
