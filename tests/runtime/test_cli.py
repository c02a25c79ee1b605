"""nsinit's command line (issue 14, items 6 and 7): strict, argparse's conventions, documented exits.

Usage errors exit 2 with a usage line and "nsinit: error: ..." on stderr; --help and --version
exit 0 on stdout; exec's arguments after the command are the command's, verbatim. The exec fast
path (parse_fast, no argparse) must read every command line it takes exactly as argparse does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import nsruntime
from nsruntime import cli
from nsruntime.state import StateDir
from tests.conftest import NSINIT, REPO, make_busybox_rootfs, nsinit, records

pytestmark = pytest.mark.privileged

# the command may start before nsinit has written its records; they are all there once /pid is
WAIT_FOR_PID = "i=0; while [ ! -s /pid ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; "

USAGE = """usage: nsinit [--root DIR] exec [--] CMD [ARG...]
       nsinit [--root DIR] state
       nsinit [--root DIR] kill [SIGNAL]
       nsinit [--root DIR] delete [--force]
       nsinit --help | --version
"""


@pytest.mark.parametrize("argv", [
    ["exec", "sh"],
    ["exec", "sh", "-c", "echo $0", "--help"],
    ["exec", "--", "--help"],
    ["exec", "--", "sh", "--", "-x"],
    ["exec", "--", "--", "sh"],
    ["--root", "/r", "exec", "sh", "--root", "x"],
    ["--root=/r", "exec", "--", "sh"],
    ["--root", "exec", "exec", "sh"],
    ["exec", "sh", "--version"],
])
def test_the_exec_fast_path_reads_a_command_line_as_argparse_does(argv: list[str]) -> None:
    fast = cli.parse_fast(argv)
    assert fast is not None
    assert fast == cli.parse_full(argv)


@pytest.mark.parametrize("argv", [
    [], ["exec"], ["exec", "--"], ["exec", "--help"], ["exec", "-h"], ["exec", "-x", "sh"], ["--root"],
    ["--root", "exec"], ["--root", "-x", "exec", "sh"], ["--root=", "exec", "sh"], ["--help", "exec", "sh"],
    ["--ro", "/r", "exec", "sh"], ["state"], ["delete", "--force"], ["kill", "USR1"], ["--version"],
])
def test_the_fast_path_leaves_everything_else_to_argparse(argv: list[str]) -> None:
    assert cli.parse_fast(argv) is None


def test_help_prints_plain_text_on_stdout_and_exits_0(tmp_path: Path) -> None:
    r = nsinit(tmp_path, "--help")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.startswith(USAGE)
    assert "``" not in r.stdout and "::" not in r.stdout  # no RST markup
    assert "  2     usage error\n" in r.stdout and "NSINIT_STATE_ROOT" in r.stdout


@pytest.mark.parametrize(("verb", "usage"), [
    ("exec", "usage: nsinit [--root DIR] exec [--] CMD [ARG...]\n"),
    ("delete", "usage: nsinit [--root DIR] delete [--force]\n"),
    ("state", "usage: nsinit [--root DIR] state\n"),
    ("kill", "usage: nsinit [--root DIR] kill [SIGNAL]\n"),
])
def test_a_verbs_help_prints_its_help_and_does_nothing_else(busybox_rootfs: Path, verb: str, usage: str) -> None:
    before = set(os.listdir(busybox_rootfs))
    r = nsinit(busybox_rootfs, verb, "--help")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith(usage)
    assert set(os.listdir(busybox_rootfs)) == before and not records(busybox_rootfs).exists()


def test_version_prints_the_packages_version(tmp_path: Path) -> None:
    from supervisor import __version__

    r = nsinit(tmp_path, "--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"nsinit {__version__}\n", "")


@pytest.mark.parametrize(("args", "error"), [
    ((), "the following arguments are required: VERB"),
    (("bogus",), "argument VERB: invalid choice: 'bogus' (choose from 'exec', 'state', 'kill', 'delete')"),
    (("--root",), "argument --root: expected one argument"),
    (("--root=", "state"), "argument --root: expected a directory, got an empty string"),
    (("delete", "--bogus"), "unrecognized arguments: --bogus"),
    (("state", "extra"), "unrecognized arguments: extra"),
    (("kill", "TERM", "extra"), "unrecognized arguments: extra"),
    (("exec",), "exec: no command given"),
    (("exec", "--"), "exec: no command given"),
    (("exec", "-x", "sh"), "unrecognized arguments: -x"),
])
def test_a_usage_error_exits_2_with_the_usage_and_one_error_line(busybox_rootfs: Path, args: tuple[str, ...],
                                                                 error: str) -> None:
    before = set(os.listdir(busybox_rootfs))
    r = nsinit(busybox_rootfs, *args)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == USAGE + f"nsinit: error: {error}\n"
    assert set(os.listdir(busybox_rootfs)) == before and not records(busybox_rootfs).exists()


def test_exec_passes_what_follows_the_command_verbatim(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", 'echo "$@"', "sh", "--help", "--root", "x", "--")
    assert (r.returncode, r.stdout, r.stderr) == (0, "--help --root x --\n", "")
    r = nsinit(busybox_rootfs, "exec", "--", "--help")  # after --, --help is the command
    assert r.returncode == 127 and "--help" in r.stderr


def _with_closed(busybox_rootfs: Path, fd: int, *command: str) -> subprocess.CompletedProcess[str]:
    """`nsinit exec COMMAND...` started by a shell with descriptor fd closed (`N>&-`)."""
    line = " ".join([*(f"'{a}'" for a in (*NSINIT, "exec", *command)), f"{fd}>&-"])
    return subprocess.run(["sh", "-c", line], cwd=busybox_rootfs, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_closed_stdout_becomes_dev_null_for_the_command(busybox_rootfs: Path) -> None:
    # before: nsinit's own descriptors took number 1, the command wrote into one of them ("write
    # error: Bad file descriptor") and nsinit itself died on sys.stdout being None
    r = _with_closed(busybox_rootfs, 1, "sh", "-c", "echo lost; echo $(readlink /proc/$$/fd/1) >&2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "/dev/null\n")


def test_a_closed_stdin_or_stderr_becomes_dev_null_too(busybox_rootfs: Path) -> None:
    r = _with_closed(busybox_rootfs, 0, "sh", "-c", "cat; readlink /proc/self/fd/0")
    assert (r.returncode, r.stdout, r.stderr) == (0, "/dev/null\n", "")
    r = _with_closed(busybox_rootfs, 2, "sh", "-c", "echo lost >&2; readlink /proc/self/fd/2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "/dev/null\n", "")


def test_the_command_starts_with_default_dispositions_and_no_blocked_signal(busybox_rootfs: Path) -> None:
    def ignore_and_block() -> None:  # what `nohup` and a careless parent leave behind
        for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGRTMIN + 2):
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGWINCH})

    r = subprocess.run([*NSINIT, "exec", "cat", "/proc/self/status"], cwd=busybox_rootfs, capture_output=True,
                       text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)},
                       preexec_fn=ignore_and_block)
    assert r.returncode == 0, r.stderr
    masks = dict(line.split(":\t") for line in r.stdout.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    assert masks == {"SigBlk": "0000000000000000", "SigIgn": "0000000000000000", "SigCgt": "0000000000000000"}


def test_the_exec_path_does_not_import_argparse(busybox_rootfs: Path) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsruntime.cli", "exec", "true"], cwd=busybox_rootfs,
                       capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "nsruntime.creator" in imported and not imported & {"argparse", "gettext"}


def test_a_rootfs_directory_named_with_non_ascii_letters_and_a_space_runs(tmp_path: Path) -> None:
    root = make_busybox_rootfs(tmp_path / "ü dir")
    r = nsinit(root, "exec", "cat", "/proc/1/comm")
    assert (r.returncode, r.stdout, r.stderr) == (0, "nsinit-init\n", "")
    assert records(root).name.isascii() and not records(root).exists()


def test_exec_from_the_hosts_root_is_refused_before_anything_is_made(busybox_rootfs: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "container.json").write_text((busybox_rootfs / "container.json").read_text())
    r = nsinit(Path("/"), "--root", str(conf), "exec", "sh", "-c", "true")
    assert (r.returncode, r.stdout) == (125, "")
    assert r.stderr == ("nsinit: the rootfs is the current directory (/), the host's root: cd to the container's root "
                        "directory (the one holding its /bin, /etc...) and run nsinit from there\n")
    assert os.listdir(conf) == ["container.json"]


def test_a_root_option_inside_the_rootfs_is_refused(busybox_rootfs: Path) -> None:
    inside = busybox_rootfs / "etc" / "nsinit"
    inside.mkdir()
    (inside / "container.json").write_text((busybox_rootfs / "container.json").read_text())
    for verb in (("exec", "true"), ("state",), ("kill",), ("delete",)):
        r = nsinit(busybox_rootfs, "--root", str(inside), *verb)
        assert r.returncode == 125, verb
        assert r.stderr == (f"nsinit: --root {inside} is inside the rootfs {busybox_rootfs} (the current directory), "
                            "where the container could rewrite its records: use a directory outside it\n")
        assert os.listdir(inside) == ["container.json"]


@pytest.mark.parametrize("where", [".", "run/state"])
def test_the_api_refuses_a_state_dir_in_the_rootfs(busybox_rootfs: Path, where: str) -> None:
    cfg = nsruntime.load_config(busybox_rootfs / "container.json")
    state = (busybox_rootfs / where).resolve()
    with pytest.raises(nsruntime.StateError) as e:
        nsruntime.create(cfg, busybox_rootfs, ["true"], state)
    assert str(e.value) == (f"state dir {state} is inside the rootfs {busybox_rootfs}: the container could rewrite "
                            "its records; keep them outside")
    assert not (busybox_rootfs / "run").exists() and not (busybox_rootfs / "state.json").exists()


def test_create_without_waiting_refuses_a_held_lock_at_once(busybox_rootfs: Path, tmp_path: Path) -> None:
    cfg = nsruntime.load_config(busybox_rootfs / "container.json")
    state = tmp_path / "state"
    with StateDir(state).locked(), pytest.raises(nsruntime.StateError) as e:
        nsruntime.begin_create(cfg, busybox_rootfs, ["true"], state, wait_lock=False)
    assert str(e.value) == f"{state}: locked by another nsinit (a container is being made here)"
    assert os.listdir(state) == []


def test_records_are_root_only_and_go_with_the_container(busybox_rootfs: Path) -> None:
    r = nsinit(busybox_rootfs, "exec", "sh", "-c", WAIT_FOR_PID + "cat /pid")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout)  # the copy in the rootfs
    st = records(busybox_rootfs).parent.stat()
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == 0
    assert not records(busybox_rootfs).exists() and not (busybox_rootfs / "pid").exists()


def test_state_root_is_taken_from_the_environment(busybox_rootfs: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NSINIT_STATE_ROOT": str(tmp_path / "records")}
    p = subprocess.Popen([sys.executable, "-m", "nsruntime.cli", "exec", "sh", "-c", WAIT_FOR_PID + "echo up; read x"],
                         cwd=busybox_rootfs, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "up\n"
        [rec] = (tmp_path / "records").iterdir()
        r = subprocess.run([sys.executable, "-m", "nsruntime.cli", "state"], cwd=busybox_rootfs, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and json.loads(r.stdout)["pid"] == int((rec / "pid").read_text())
    finally:
        p.communicate("\n", timeout=10)
    assert p.returncode == 0
    assert list((tmp_path / "records").iterdir()) == []
