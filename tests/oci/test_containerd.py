"""Real containerd 1.6 (Debian's) driving nsrun through its runc v2 shim (issue 16).

The module starts its own containerd (root, state and socket under a temporary directory, no
CRI, the native snapshotter), imports an OCI image layout built here from busybox-static, and
runs `ctr` against it with `--runc-binary` naming this tree's nsrun and `--runc-root` keeping
nsrun's state under the temporary directory too. Each test removes what it made and checks that
nothing is left: no task, no container, no nsrun state; the module checks, once containerd is
stopped, that no mount, cgroup or process of it stayed on the host.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect
import pytest

from nsruntime import libc
from tests.conftest import REPO, make_busybox_rootfs

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SHIM = "/usr/bin/containerd-shim-runc-v2"

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.slow,
    pytest.mark.skipif(not all(os.path.exists(p) for p in (CONTAINERD, CTR, SHIM)),
                       reason="containerd is not installed (Debian's containerd: /usr/bin/containerd, ctr and "
                              "containerd-shim-runc-v2)"),
]

IMAGE = "localhost/nsrun-busybox:latest"
BOOT_TIMEOUT = 30.0
EVENT_TIMEOUT = 30.0
# the plugins a test run does not need: CRI (Kubernetes' API), the snapshotters other than native,
# /opt/containerd, tracing
DISABLED_PLUGINS = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.overlayfs",
                    "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
# where the shim (1.6) puts its sockets whatever containerd's state is: left empty behind it
SHIM_SOCKETS = Path("/run/containerd/s")


# ------------------------------------------------------------------ the image


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def oci_image_archive(rootfs: Path, dest: Path, ref: str = "latest") -> Path:
    """An OCI image layout (oci-layout, index.json, blobs: one gzipped layer, its config and
    manifest) of rootfs, as the tar `ctr images import` reads."""
    layout = dest.parent / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for p in sorted(rootfs.rglob("*")):
            t.add(p, arcname=str(p.relative_to(rootfs)), recursive=False)
    layer = buf.getvalue()
    layer_digest, layer_size = _blob(layout, gzip.compress(layer, mtime=0))
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    config_digest, config_size = _blob(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                            "size": layer_size}]}
    manifest_digest, manifest_size = _blob(layout, json.dumps(manifest).encode())
    index = {"schemaVersion": 2,
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                            "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
                            "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    with tarfile.open(dest, "w") as t:
        for p in sorted(layout.rglob("*")):
            t.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return dest


# ------------------------------------------------------------------ containerd


@dataclass
class Containerd:
    """One containerd of the test's own, and ctr pointed at it and at this tree's nsrun."""

    dir: Path
    namespace: str
    proc: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)
    events: queue.Queue[str] = field(default_factory=queue.Queue)
    event_reader: subprocess.Popen[str] | None = None
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    @property
    def nsrun(self) -> Path:
        return self.dir / "nsrun"

    @property
    def runc_root(self) -> Path:
        """nsrun's --root as the shim passes it: --runc-root, then the namespace."""
        return self.dir / "nsrun-state"

    @property
    def fifo_dir(self) -> Path:
        return self.dir / "fifo"

    def write_config(self) -> Path:
        cfg = self.dir / "config.toml"
        cfg.write_text("\n".join([
            "version = 2",
            f'root = "{self.dir}/root"',
            f'state = "{self.dir}/state"',
            f"disabled_plugins = {json.dumps(DISABLED_PLUGINS)}",
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  address = ""',
            '  level = "debug"',
            "[metrics]",
            '  address = ""',
            "",
        ]))
        # the shim runs nsrun with its own environment (and the cleanup delete with none): a
        # launcher that needs no PATH and no installed package
        self.nsrun.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} {REPO}/bin/nsrun "$@"\n')
        self.nsrun.chmod(0o755)
        return cfg

    def ctr(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([CTR, "--address", self.address, "--namespace", self.namespace, *args],
                           capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "CONTAINERD_SNAPSHOTTER": "native"})
        if check:
            assert p.returncode == 0, f"ctr {' '.join(args)}: {p.returncode} {p.stderr}{self.tail()}"
        return p

    def runtime_flags(self) -> list[str]:
        return ["--runtime", "io.containerd.runc.v2", "--runc-binary", str(self.nsrun),
                "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir)]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`ctr run` with nsrun as the shim's runtime: ARGS are run's own (flags, IMAGE, ID, COMMAND)."""
        return self.ctr("run", *self.runtime_flags(), *args, timeout=timeout, check=False)

    def tail(self, n: int = 30) -> str:
        lines = [line for line in self.log if 'msg="event published"' not in line]
        return "\ncontainerd's last lines:\n" + "\n".join(lines[-n:])

    def start(self) -> None:
        cfg = self.write_config()
        # no PATH: the shim finds itself next to containerd, and nsrun must start without one
        self.proc = subprocess.Popen([CONTAINERD, "--config", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"LC_ALL": "C"})
        booted = threading.Event()

        def read_log() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log.append(line)
                if "containerd successfully booted" in line:
                    booted.set()
            booted.set()  # it exited: the wait below says so

        self.readers.append(threading.Thread(target=read_log, daemon=True))
        self.readers[-1].start()
        assert booted.wait(BOOT_TIMEOUT), f"containerd did not boot within {BOOT_TIMEOUT} s{self.tail()}"
        assert self.proc.poll() is None, f"containerd exited with {self.proc.returncode}{self.tail()}"
        self.ctr("version")
        self._follow_events()

    def _follow_events(self) -> None:
        """Subscribe to containerd's events, and know it is subscribed: the namespace's creation
        (after the subscription) is the first event seen."""
        self.event_reader = subprocess.Popen([CTR, "--address", self.address, "events"], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read_events() -> None:
            assert self.event_reader is not None and self.event_reader.stdout is not None
            for line in self.event_reader.stdout:
                self.events.put(line.rstrip("\n"))

        self.readers.append(threading.Thread(target=read_events, daemon=True))
        self.readers[-1].start()
        # the subscription is asynchronous: create namespaces until one's creation is seen
        for attempt in range(50):
            probe = f"{self.namespace}-probe{attempt}"
            self.ctr("namespaces", "create", probe)

            def created(e: dict[str, Any], probe: str = probe) -> bool:
                return bool(e["topic"] == "/namespaces/create" and e["body"].get("name") == probe)

            try:
                self.event(created, timeout=0.2)
            except AssertionError:
                continue
            finally:
                self.ctr("namespaces", "remove", probe)
            return
        raise AssertionError(f"ctr events did not report the creation of a namespace{self.tail()}")

    def event(self, match: Callable[[dict[str, Any]], bool], timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        """The next event (topic, namespace, body) for which match is true, read from the
        subscription (bounded); those that do not match are dropped."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                line = self.events.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no such event within {timeout} s{self.tail()}") from None
            m = re.search(r" (\S+) (/\S+) (\{.*\})$", line)  # TIME NAMESPACE TOPIC JSON
            if m is None:
                continue
            ev = {"namespace": m.group(1), "topic": m.group(2), "body": json.loads(m.group(3))}
            if match(ev):
                return ev

    def exit_status(self, cid: str, exec_id: str | None = None) -> int:
        """The exit status containerd reports for the task (or its exec'd process) cid."""
        ev = self.event(lambda e: e["topic"] == "/tasks/exit" and e["namespace"] == self.namespace
                        and e["body"].get("container_id") == cid and e["body"].get("id") == (exec_id or cid))
        return int(ev["body"].get("exit_status", 0))  # (0 is left out of the JSON)

    def stop(self) -> None:
        if self.event_reader is not None:
            self.event_reader.terminate()
            self.event_reader.wait(10)
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in self.readers:  # at EOF now that both have exited
            t.join(10)
        for p in (self.proc, self.event_reader):
            if p is not None:
                for f in (p.stdout, p.stderr):
                    if f is not None:
                        f.close()


def _processes_naming(text: str) -> list[int]:
    """Processes whose command line holds text (this containerd's shims and nsrun calls name its
    directory): reparented to init, a shim is not the test run's descendant."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmd and int(d) != os.getpid():
            found.append(int(d))
    return found


def _mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [mp for mp in (line.split()[4] for line in f) if mp.startswith(f"{top}/")]


def left_by(c: Containerd) -> dict[str, list[str]]:
    """What of this containerd is still on the host: processes, mounts, cgroups, shim sockets."""
    left = {"processes": [f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}"
                          for pid in _processes_naming(str(c.dir))],
            "mounts": _mounts_under(c.dir),
            "cgroups": [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{c.namespace}")]}
    return {k: v for k, v in left.items() if v}


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            libc.wait_readable(pidfd, timeout)
        finally:
            os.close(pidfd)


def _remove_cgroups(namespace: str) -> list[str]:
    """Remove the namespace's cgroup trees (ctr names cgroups /NAMESPACE/ID), deepest first;
    returns what could not be removed. The kernel may take a moment to release a cgroup whose
    last process just exited: each rmdir is retried, bounded."""
    import time

    stuck = []
    for top in Path("/sys/fs/cgroup").glob(f"*/{namespace}"):
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            end = time.monotonic() + 5
            while True:
                try:
                    d.rmdir()
                    break
                except OSError as e:
                    if time.monotonic() > end:
                        stuck.append(f"{d}: {e.strerror}")
                        break
                    time.sleep(0.05)
    return stuck


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    had_shim_sockets = SHIM_SOCKETS.exists()
    had_run_containerd = SHIM_SOCKETS.parent.exists()
    c = Containerd(tmp_path_factory.mktemp("ctrd"), namespace=f"nsrun-test-{os.getpid()}")
    try:
        c.start()
        rootfs = make_busybox_rootfs(c.dir / "image-rootfs")
        (rootfs / "container.json").unlink()
        archive = oci_image_archive(rootfs, c.dir / "image.tar")
        c.ctr("images", "import", "--base-name", IMAGE.split(":")[0], str(archive))
        yield c
        c.ctr("images", "remove", IMAGE)
    finally:
        shim_sockets = [Path(a.read_text().strip().removeprefix("unix://"))
                        for a in (c.dir / "state").glob("io.containerd.runtime.v2.task/*/*/address")]
        c.stop()
        left = left_by(c)
        # whatever happened, leave nothing: kill, unmount, remove (then say what there was)
        _kill_and_wait(_processes_naming(str(c.dir)))  # shims, nsrun calls, PID 1s (their pid namespaces)
        for mp in sorted(_mounts_under(c.dir), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False)
        for sock in shim_sockets:
            sock.unlink(missing_ok=True)  # a killed shim's
        if stuck := _remove_cgroups(c.namespace):
            left["cgroups not removable"] = stuck
        for d, had in ((SHIM_SOCKETS, had_shim_sockets), (SHIM_SOCKETS.parent, had_run_containerd)):
            if not had:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty: another containerd's shims may live there
        if not had_run_containerd and SHIM_SOCKETS.parent.exists():
            left["/run/containerd"] = [str(p) for p in SHIM_SOCKETS.parent.rglob("*")]
    assert not left, f"containerd left on the host: {left}"


@pytest.fixture
def ctrd(containerd: Containerd) -> Iterator[Containerd]:
    """The module's containerd; after the test, its tasks and containers are gone, and so are
    nsrun's records of them and the namespace's cgroup (the test plays the kubelet: nsrun makes
    a cgroupsPath's parents and removes only the leaf)."""
    yield containerd
    containers = containerd.ctr("containers", "list", "--quiet").stdout.split()
    for cid in containers:
        containerd.ctr("tasks", "delete", "--force", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
    ns_state = containerd.runc_root / containerd.namespace
    left = os.listdir(ns_state) if ns_state.exists() else []
    stuck = _remove_cgroups(containerd.namespace)  # /NAMESPACE, and a pod's parents made by nsrun
    assert containers == [], "the test removes its containers"
    assert left == [], f"nsrun's state left in {ns_state}"
    assert stuck == [], "the containers' cgroups are gone, the parents empty"


# ------------------------------------------------------------------ the tests


def tasks(c: Containerd) -> dict[str, tuple[int, str]]:
    """`ctr task ls`: task id -> (pid, status)."""
    rows = c.ctr("tasks", "list").stdout.splitlines()[1:]
    return {r.split()[0]: (int(r.split()[1]), r.split()[2]) for r in rows}


def cgroup_of(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _n, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    raise AssertionError(f"no {controller} cgroup for {pid}")


def remove(c: Containerd, cid: str) -> None:
    """ctr task delete, then container rm, as a user removes a stopped task."""
    c.ctr("tasks", "delete", cid)
    c.ctr("containers", "delete", cid)


@pytest.mark.parametrize(("command", "code", "out"), [
    (["echo", "hi"], 0, "hi\n"),
    (["sh", "-c", "echo to stderr >&2; exit 3"], 3, ""),
    (["sh", "-c", "kill -9 $$"], 137, ""),
])
def test_run_rm_prints_the_output_and_its_exit_status_is_ctrs(ctrd: Containerd, command: list[str], code: int,
                                                             out: str) -> None:
    p = ctrd.run("--rm", IMAGE, "once", *command)
    assert (p.returncode, p.stdout) == (code, out), p.stderr + ctrd.tail()
    assert ctrd.ctr("containers", "list", "--quiet").stdout == "", "--rm removed the container"


def test_a_missing_command_fails_the_run_with_nsruns_words(ctrd: Containerd) -> None:
    p = ctrd.run("--rm", IMAGE, "nocmd", "/no/such/command")
    assert (p.returncode, p.stderr) == (1, "ctr: failed to create shim task: OCI runtime create failed: "
                                        'container init: process.args: exec "/no/such/command": executable file not '
                                        "found: no such file or directory: unknown\n"), "nsrun's JSON log reached ctr"
    assert ctrd.ctr("containers", "list", "--quiet").stdout == "", "--rm removed the container"


def test_a_detached_task_is_listed_exec_d_into_and_shown_by_ps(ctrd: Containerd) -> None:
    p = ctrd.run("-d", IMAGE, "bg", "sh", "-c", "echo ran > /tmp/marker; exec sleep 1000")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr + ctrd.tail()
    pid, status = tasks(ctrd)["bg"]
    assert status == "RUNNING"
    assert cgroup_of(pid, "pids") == f"/{ctrd.namespace}/bg", "ctr's cgroupsPath /NAMESPACE/ID, from the root"
    assert (ctrd.runc_root / ctrd.namespace / "bg" / "state.json").is_file(), "nsrun's state under --runc-root"
    try:
        p = ctrd.ctr("tasks", "exec", "--fifo-dir", str(ctrd.fifo_dir), "--exec-id", "e1", "bg",
                     "sh", "-c", "cat /tmp/marker; echo $$; exit 7", check=False)
        assert p.returncode == 7, p.stderr + ctrd.tail()
        marker, exec_pid = p.stdout.split()
        assert marker == "ran" and int(exec_pid) > 1, "in the task's root and pid namespace"
        p = ctrd.ctr("tasks", "exec", "--fifo-dir", str(ctrd.fifo_dir), "--exec-id", "e2", "bg", "/no/such/command",
                     check=False)
        assert (p.returncode, p.stderr) == (1, 'ctr: OCI runtime exec failed: join: process.args: exec '
                                            '"/no/such/command": executable file not found: no such file or '
                                            "directory: unknown\n")
        p = ctrd.ctr("tasks", "exec", "--fifo-dir", str(ctrd.fifo_dir), "--exec-id", "e3", "--user", "1000",
                     "--cwd", "/tmp", "bg", "sh", "-c", 'echo "$(id -u) $(pwd)"')
        assert p.stdout == "1000 /tmp\n"
        listed = ctrd.ctr("tasks", "ps", "bg").stdout.splitlines()
        assert listed[0].split() == ["PID", "INFO"]
        pids = {int(r.split()[0]) for r in listed[1:]}
        assert pid in pids and len(pids) == 2, "PID 1 and sleep: the exec'd process is gone"
    finally:
        ctrd.ctr("tasks", "kill", "--signal", "KILL", "bg")
        assert ctrd.exit_status("bg") == 137
        remove(ctrd, "bg")


def test_pause_and_resume_freeze_and_thaw_the_task(ctrd: Containerd) -> None:
    assert ctrd.run("-d", IMAGE, "frz", "sleep", "1000").returncode == 0
    pid, _ = tasks(ctrd)["frz"]
    try:
        ctrd.ctr("tasks", "pause", "frz")
        assert tasks(ctrd)["frz"] == (pid, "PAUSED")
        freezer = Path("/sys/fs/cgroup/freezer") / ctrd.namespace / "frz" / "freezer.state"
        assert freezer.read_text() == "FROZEN\n"
        ctrd.ctr("tasks", "resume", "frz")
        assert tasks(ctrd)["frz"] == (pid, "RUNNING")
        assert freezer.read_text() == "THAWED\n"
    finally:
        ctrd.ctr("tasks", "kill", "--signal", "KILL", "frz")
        assert ctrd.exit_status("frz") == 137
        remove(ctrd, "frz")


def test_kill_sends_term_by_default_and_the_signal_asked_for(ctrd: Containerd, tmp_path: Path) -> None:
    ready = tmp_path / "io" / "ready"
    ready.parent.mkdir()
    os.mkfifo(ready)
    reader = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)  # readable once the task has written its line
    share = f"type=bind,src={ready.parent},dst=/io,options=rbind"
    try:
        assert ctrd.run("-d", IMAGE, "k1", "sleep", "1000").returncode == 0
        assert ctrd.run("-d", "--mount", share, IMAGE, "k2",
                        "sh", "-c", "trap 'exit 42' USR1; echo ready > /io/ready; while :; do sleep 1; done"
                        ).returncode == 0
        assert ctrd.run("-d", IMAGE, "k3", "sh", "-c", "sleep 1000 & sleep 1000").returncode == 0
        ctrd.ctr("tasks", "kill", "k1")
        assert ctrd.exit_status("k1") == 128 + signal.SIGTERM
        assert libc.wait_readable(reader, EVENT_TIMEOUT), "k2 did not set its trap"
        assert os.read(reader, 100) == b"ready\n"
        ctrd.ctr("tasks", "kill", "--signal", "SIGUSR1", "k2")
        assert ctrd.exit_status("k2") == 42, "USR1 reached the command, whose trap exited"
        ctrd.ctr("tasks", "kill", "--all", "--signal", "9", "k3")
        assert ctrd.exit_status("k3") == 137
        assert {cid: status for cid, (_pid, status) in tasks(ctrd).items()} == {
            "k1": "STOPPED", "k2": "STOPPED", "k3": "STOPPED"}
    finally:
        os.close(reader)
        for cid in ("k1", "k2", "k3"):
            ctrd.ctr("tasks", "kill", "--signal", "KILL", cid, check=False)
    for cid in ("k1", "k2", "k3"):
        remove(ctrd, cid)


def test_a_pod_app_joins_the_pause_containers_namespaces_by_path(ctrd: Containerd, tmp_path: Path) -> None:
    """The shape Kubernetes gives a pod through containerd: a read-only pause container, and an
    app that joins its network, ipc and uts namespaces by path, with its own pid namespace, a
    single-file /etc/hosts the image lacks and a cgroup nested under the pod's."""
    hosts = tmp_path / "hosts"
    hosts.write_text("10.1.2.3 pod\n")
    assert ctrd.run("-d", "--read-only", IMAGE, "pause", "sleep", "1000").returncode == 0
    pause, _ = tasks(ctrd)["pause"]
    try:
        joins = [f"--with-ns={kind}:/proc/{pause}/ns/{ns}" for kind, ns in
                 (("network", "net"), ("ipc", "ipc"), ("uts", "uts"))]
        p = ctrd.run("--rm", *joins, "--mount", f"type=bind,src={hosts},dst=/etc/hosts,options=rbind:ro",
                     "--cgroup", f"/{ctrd.namespace}/pod1/app", IMAGE, "app",
                     "sh", "-c", "for n in net ipc uts pid; do readlink /proc/self/ns/$n; done; cat /etc/hosts; "
                     "grep :pids: /proc/self/cgroup | cut -d: -f3; touch /etc/hosts 2>/dev/null || echo ro")
        assert p.returncode == 0, p.stderr + ctrd.tail()
        ns = [os.readlink(f"/proc/{pause}/ns/{n}") for n in ("net", "ipc", "uts", "pid")]
        lines = p.stdout.splitlines()
        assert lines[:3] == ns[:3], "the pause container's network, ipc and uts namespaces"
        assert lines[3] not in (ns[3], os.readlink("/proc/self/ns/pid")), "a pid namespace of its own"
        assert lines[4:] == ["10.1.2.3 pod", f"/{ctrd.namespace}/pod1/app", "ro"]
        assert not (Path("/sys/fs/cgroup/pids") / ctrd.namespace / "pod1" / "app").exists(), "the leaf is gone"
        assert (Path("/sys/fs/cgroup/pids") / ctrd.namespace / "pod1").is_dir(), "the pod's parent stays"
    finally:
        ctrd.ctr("tasks", "kill", "--signal", "KILL", "pause")
        assert ctrd.exit_status("pause") == 137
        remove(ctrd, "pause")


def test_when_the_shim_dies_containerds_cleanup_deletes_the_container_through_nsrun(ctrd: Containerd) -> None:
    """containerd runs `containerd-shim-runc-v2 delete`, which calls `nsrun delete --force ID`
    from the bundle's directory with no PATH: the container and nsrun's records of it go."""
    assert ctrd.run("-d", IMAGE, "orphan", "sleep", "1000").returncode == 0
    pid, _ = tasks(ctrd)["orphan"]
    bundle = ctrd.dir / "state" / "io.containerd.runtime.v2.task" / ctrd.namespace / "orphan"
    shim_socket = Path((bundle / "address").read_text().strip().removeprefix("unix://"))
    pidfd = os.pidfd_open(pid)
    try:
        [shim] = [p for p in _processes_naming(str(ctrd.address)) if Path(f"/proc/{p}/cmdline").read_bytes().split(
            b"\0")[:1] == [SHIM.encode()] and b"orphan" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(shim, signal.SIGKILL)
        assert ctrd.exit_status("orphan") == 128 + signal.SIGKILL
        assert libc.wait_readable(pidfd, EVENT_TIMEOUT), "the container's PID 1 was killed"
    finally:
        os.close(pidfd)
        shim_socket.unlink(missing_ok=True)  # the dead shim's, which nobody else removes
    assert not (ctrd.runc_root / ctrd.namespace / "orphan").exists(), "nsrun's records are gone"
    assert not (Path("/sys/fs/cgroup/pids") / ctrd.namespace / "orphan").exists()
    ctrd.ctr("containers", "delete", "orphan")


def test_a_memory_limit_is_enforced_and_containerd_sees_the_oom_kill(ctrd: Containerd) -> None:
    p = ctrd.run("--rm", "--memory-limit", str(32 << 20), IMAGE, "oom", "tail", "/dev/zero")  # one endless line
    assert p.returncode == 137, p.stderr + ctrd.tail()
    ctrd.event(lambda e: e["topic"] == "/tasks/oom" and e["body"].get("container_id") == "oom")


def test_run_privileged_gets_every_capability_and_the_hosts_devices(ctrd: Containerd) -> None:
    p = ctrd.run("--rm", "--privileged", IMAGE, "priv", "sh", "-c",
                 "grep CapEff /proc/self/status; readlink /dev/ptmx; stat -c '%t:%T' /dev/kmsg")
    assert p.returncode == 0, p.stderr + ctrd.tail()
    mine = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("CapEff"))
    assert p.stdout.splitlines() == [mine, "pts/ptmx", "1:b"], "the container's own ptmx, the host's kmsg"


def test_run_t_gives_the_command_a_terminal(ctrd: Containerd) -> None:
    child = pexpect.spawn(CTR, ["--address", ctrd.address, "--namespace", ctrd.namespace, "run", "-t", "--rm",
                                *ctrd.runtime_flags(), IMAGE, "tty1",
                                "sh", "-c", "tty; read -r line; echo got $line; exit 4"],
                          env={**os.environ, "CONTAINERD_SNAPSHOTTER": "native"}, timeout=30, encoding="utf-8")
    try:
        # \r\r\n: the container's pty and the one ctr runs under each turn \n into \r\n
        child.expect("/dev/pts/0\r+\n")
        child.sendline("abc")
        child.expect("got abc\r+\n")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 4


def test_task_exec_t_gives_the_process_a_terminal(ctrd: Containerd) -> None:
    assert ctrd.run("-d", IMAGE, "host", "sleep", "1000").returncode == 0
    try:
        child = pexpect.spawn(CTR, ["--address", ctrd.address, "--namespace", ctrd.namespace, "tasks", "exec", "-t",
                                    "--fifo-dir", str(ctrd.fifo_dir), "--exec-id", "t1", "host",
                                    "sh", "-c", "tty; read -r line; echo got $line; exit 5"],
                              timeout=30, encoding="utf-8")
        try:
            child.expect("/dev/pts/0\r+\n")
            child.sendline("xyz")
            child.expect("got xyz\r+\n")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus == 5
    finally:
        ctrd.ctr("tasks", "kill", "--signal", "KILL", "host")
        assert ctrd.exit_status("host") == 137
        remove(ctrd, "host")


def test_run_rootfs_runs_a_directory(ctrd: Containerd, tmp_path: Path) -> None:
    rootfs = make_busybox_rootfs(tmp_path / "rootfs")
    p = ctrd.run("--rm", "--rootfs", str(rootfs), "dir", "sh", "-c", "cat /container.json >/dev/null && echo hi")
    assert (p.returncode, p.stdout) == (0, "hi\n"), p.stderr + ctrd.tail()
