"""nsruntime.apparmor: the refusal where AppArmor is off (this machine), and the write path against a
fake attribute file (the kernel's can't be shown without AppArmor)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nsruntime import apparmor
from nsruntime.errors import SetupError


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    enabled = tmp_path / "enabled"
    enabled.write_text("Y\n")
    profiles = tmp_path / "profiles"
    profiles.write_text("docker-default (enforce)\nmy profile (complain)\n/usr/bin/man (enforce)\n")
    attr = tmp_path / "exec"
    attr.write_text("")
    return {"enabled": str(enabled), "profiles": str(profiles), "attr": str(attr)}


@pytest.mark.skipif(apparmor.enabled(), reason="AppArmor is enabled on this machine")
def test_this_machine_refuses_a_profile() -> None:
    with pytest.raises(SetupError) as ei:
        apparmor.check("docker-default")
    msg = str(ei.value)
    assert msg.startswith('apparmor: profile "docker-default" asked for, but AppArmor is not enabled')
    assert "refusing to run the command unconfined" in msg and apparmor.ENABLED_PATH in msg
    assert "\n" not in msg


@pytest.mark.parametrize("content", [None, "N\n", ""])
def test_check_refuses_when_disabled_or_absent(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "enabled"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SetupError, match="not enabled"):
        apparmor.check("docker-default", enabled_path=str(path))


def test_check_accepts_a_loaded_profile(fake: dict[str, str]) -> None:
    for name in ("docker-default", "my profile", "/usr/bin/man", "unconfined"):
        apparmor.check(name, enabled_path=fake["enabled"], profiles_path=fake["profiles"])


def test_check_refuses_a_profile_not_loaded(fake: dict[str, str]) -> None:
    with pytest.raises(SetupError, match='profile "nope" is not loaded'):
        apparmor.check("nope", enabled_path=fake["enabled"], profiles_path=fake["profiles"])
    # without a readable list (securityfs not mounted) the kernel will judge at exec time
    apparmor.check("nope", enabled_path=fake["enabled"], profiles_path=fake["profiles"] + ".missing")


@pytest.mark.parametrize("name", ["", " lead", "a\nb", "a\x00b"])
def test_bad_profile_names_are_refused(fake: dict[str, str], name: str) -> None:
    with pytest.raises(SetupError, match="profile name"):
        apparmor.check(name, enabled_path=fake["enabled"], profiles_path=fake["profiles"])
    with pytest.raises(SetupError, match="profile name"):
        apparmor.apply(name, path=fake["attr"])


def test_apply_writes_exec_profile_in_one_write(fake: dict[str, str]) -> None:
    apparmor.apply("docker-default", path=fake["attr"])
    assert Path(fake["attr"]).read_bytes() == b"exec docker-default"


def test_apply_in_a_child_leaves_the_parent_alone(fake: dict[str, str]) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            apparmor.apply("my profile", path=fake["attr"])
        finally:
            os._exit(0)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert Path(fake["attr"]).read_bytes() == b"exec my profile"


def test_apply_failure_names_the_path_and_errno(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "exec"
    with pytest.raises(SetupError, match=rf"apparmor: write 'exec p' to {missing}: ENOENT \(No such file"):
        apparmor.apply("p", path=str(missing))


def test_the_attr_file_is_the_stacking_one_when_present() -> None:
    path = apparmor.attr_path()
    assert path in apparmor.ATTR_PATHS
    if os.path.exists("/proc/self/attr/apparmor/exec"):
        assert path == "/proc/self/attr/apparmor/exec"


@pytest.mark.skipif(apparmor.enabled(), reason="AppArmor is enabled on this machine")
def test_the_kernel_refuses_the_write_without_apparmor() -> None:
    # even if check() were skipped, the kernel's refusal surfaces as an error, not a silent no-op
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            apparmor.apply("docker-default")
        except SetupError:
            os._exit(3)
        os._exit(0)
    _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 3
