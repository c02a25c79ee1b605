"""nsinitd programs that name an OCI bundle (issue 16): `bundle = "DIR"` holding a config.json and
its root, as podman or skopeo unpacked it, run as a container program through the real nsruntime."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from nsruntime.oci.runtime import default_spec
from supervisor import config as c
from tests.conftest import REPO, make_busybox_rootfs

ConfigWriter = Any


def bundle(root: Path, args: list[str], **changes: Any) -> Path:
    d = root / "img"
    make_busybox_rootfs(d / "rootfs")
    spec = default_spec(args)
    spec["root"]["readonly"] = False
    spec["process"]["env"] = ["PATH=/bin", "HOME=/root"]
    spec.update(changes)
    (d / "config.json").write_text(json.dumps(spec))
    return d


def test_a_bundle_program_takes_its_command_from_the_bundle_unless_given(cfg: ConfigWriter) -> None:
    d = bundle(cfg.root, ["sh", "-c", "echo hi"])
    conf = cfg.load(f'[programs.img]\nbundle = "{d}"\n')
    p = conf.programs["img"]
    assert (p.bundle, p.container, p.command) == (d, None, ("sh", "-c", "echo hi"))
    conf = cfg.load('[programs.img]\nbundle = "img"\ncommand = ["true"]\n')
    assert (conf.programs["img"].bundle, conf.programs["img"].command) == (d, ("true",))


@pytest.mark.parametrize(("programs", "message"), [
    ('bundle = "nowhere"', "programs.img.bundle: {root}/nowhere: no config.json there"),
    ('bundle = "img"\ncontainer = "box"', "programs.img.bundle: a program runs a container or a bundle, not both"),
])  # fmt: skip
def test_a_bundle_that_cannot_run_is_refused_naming_the_program(cfg: ConfigWriter, programs: str,
                                                                 message: str) -> None:
    bundle(cfg.root, ["true"])
    with pytest.raises(c.ConfigError) as e:
        cfg.load(f"[programs.img]\n{programs}\n")
    assert str(e.value) == message.format(root=cfg.root)


@pytest.mark.parametrize(("changes", "message"), [
    ({"hooks": {"prestart": [{"path": "/bin/true"}]}}, "hooks: not run by nsinitd (nsrun runs them)"),
    ({"linux": {"namespaces": [{"type": "pid"}]}},
     "linux.namespaces: a mount namespace of the container's own is required (type mount, no path)"),
])  # fmt: skip
def test_a_bundle_nsinitd_cannot_run_as_asked_is_refused(cfg: ConfigWriter, changes: dict[str, Any],
                                                         message: str) -> None:
    d = bundle(cfg.root, ["true"], **changes)
    with pytest.raises(c.ConfigError) as e:
        cfg.load(f'[programs.img]\nbundle = "{d}"\n')
    assert str(e.value) == f"programs.img.bundle: {d}/config.json: {message}"


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_a_bundle_program_runs_as_a_container_and_stops(cfg: ConfigWriter, run_daemon) -> None:  # type: ignore[no-untyped-def]
    d = bundle(cfg.root, ["sh", "-c", "echo hello from $(hostname) $GREETING $(cat /proc/1/comm); exec sleep 300"])
    r = await run_daemon(cfg.load(f"""
        [programs.img]
        bundle = "{d}"
        environment = {{ GREETING = "hi" }}
        startsecs = 0.3
    """))
    created = await r.watcher.wait("container.created", "img")
    running = await r.watcher.wait("program.running", "img")
    assert created["host_pid"] == running["pid"] and created["container"] == str(d)
    assert "NEWPID" in created["namespaces"] and "NEWNET" in created["namespaces"]
    out = cfg.root / "logs" / "img.out"
    with trio.fail_after(10):
        while not out.exists() or b"\n" not in out.read_bytes():
            await trio.sleep(0.02)
    assert out.read_text() == "hello from nsrun hi nsinit-init\n"  # the spec's hostname, the program's env
    state_dir = r.daemon.exec_target("img")  # what nsinitctl exec joins, through nsruntime.join
    joined = await trio.run_process(
        [sys.executable, "-c", "import sys; from nsruntime import join; "
         f"sys.exit(join({str(state_dir)!r}, ['sh', '-c', 'hostname; cat /proc/1/comm; exit 7']))"],
        capture_stdout=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (joined.returncode, joined.stdout) == (7, b"nsrun\nnsinit-init\n")
    st = await r.daemon.stop("img")
    assert st.state == "STOPPED" and st.signal == "SIGTERM"
    assert not (cfg.root / "state" / "img" / "pid").exists()
