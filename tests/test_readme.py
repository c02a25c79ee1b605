"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```sh\n(.*?)```", section, re.S) for line in block.splitlines()
            if line and not line.startswith("#")]


def test_readme_has_exactly_two_commands() -> None:
    cmds = _commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("nsinitd -c configs/demo.toml")
    assert cmds[1].endswith("pytest")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()


def test_demo_config_exists() -> None:
    assert (REPO / "configs" / "demo.toml").exists()
    assert (REPO / "configs" / "host" / "container.json").exists()


def test_the_tours_config_is_one_nsinitd_accepts(tmp_path: Path) -> None:
    from supervisor.config import load

    text = (REPO / "README.md").read_text()
    toml = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(toml) == 1
    conf = tmp_path / "supervisor.toml"
    conf.write_text(toml[0].replace('"/srv/web"', f'"{REPO / "configs" / "host"}"')
                    .replace('"/run/nsinitd.sock"', f'"{tmp_path / "sock"}"'))
    cfg = load(conf)
    assert sorted(cfg.programs) == ["ticker", "web"]
