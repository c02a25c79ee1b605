"""supervisor.toml validation: every error names table and key; nsinitd exits 2 on it."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor import config as c

ISSUE_EXAMPLE = """
[supervisor]
socket = "/run/nsinit/nsinitd.sock"
event_log = "/var/log/nsinit/events.jsonl"
log_dir = "/var/log/nsinit"
state_dir = "/run/nsinit"

[programs.web]
container = "containers/web"
command = ["/bin/httpd", "-f", "-p", "8080"]
environment = { GREETING = "hi" }
autostart = true
autorestart = "on-failure"
exitcodes = [0]
startsecs = 1
startretries = 3
backoff = { initial = 1.0, factor = 2.0, max = 60.0 }
stopsignal = "TERM"
stopwaitsecs = 10
priority = 100
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "containers" / "web").mkdir(parents=True)
    (tmp_path / "containers" / "web" / "container.json").write_text("{}")
    return tmp_path / "supervisor.toml"


def test_the_issue_example_parses(base: Path) -> None:
    cfg = c.loads(ISSUE_EXAMPLE, base)
    web = cfg.programs["web"]
    assert web.container == base.parent / "containers" / "web"
    assert web.command == ("/bin/httpd", "-f", "-p", "8080")
    assert web.env == {"GREETING": "hi"}
    assert (web.autostart, web.autorestart, web.exitcodes) == (True, "on-failure", frozenset({0}))
    assert (web.startsecs, web.startretries, web.stopwaitsecs, web.priority) == (1.0, 3, 10.0, 100)
    assert web.backoff == c.Backoff(1.0, 2.0, 60.0)
    assert web.stopsignal == signal.SIGTERM
    assert cfg.supervisor.socket == Path("/run/nsinit/nsinitd.sock")
    assert cfg.supervisor.event_log == Path("/var/log/nsinit/events.jsonl")
    assert web.policy.startretries == 3


def test_defaults_and_relative_paths(base: Path) -> None:
    cfg = c.loads('[supervisor]\nlog_dir = "logs"\n[programs.a]\ncommand = ["true"]\n', base)
    a = cfg.programs["a"]
    assert cfg.supervisor.log_dir == base.parent / "logs"
    assert cfg.supervisor.event_log is None and cfg.supervisor.socket_group is None
    assert a.container is None and a.autorestart == "on-failure" and a.stdout_backups == 10
    assert a.redirect_stderr is False and a.stdout_maxbytes == 50 * 1024 * 1024


def test_sizes_signals_and_groups(base: Path) -> None:
    cfg = c.loads(
        '[supervisor]\nsocket_group = "root"\n'
        '[programs.a]\ncommand = ["true"]\nstdout_maxbytes = "10KB"\nstopsignal = "SIGINT"\n'
        '[programs.b]\ncommand = ["true"]\nstdout_maxbytes = 123\nstopsignal = 9\n', base)
    assert cfg.supervisor.socket_group == 0
    assert cfg.programs["a"].stdout_maxbytes == 10240 and cfg.programs["a"].stopsignal == signal.SIGINT
    assert cfg.programs["b"].stdout_maxbytes == 123 and cfg.programs["b"].stopsignal == signal.SIGKILL


def test_by_priority(base: Path) -> None:
    cfg = c.loads('[programs.z]\ncommand=["x"]\npriority=1\n[programs.a]\ncommand=["x"]\npriority=2\n'
                  '[programs.b]\ncommand=["x"]\npriority=1\n', base)
    assert [p.name for p in cfg.by_priority()] == ["b", "z", "a"]


BAD = [
    ('autorestart = "sometimes"', "programs.web.autorestart: expected one of always, on-failure, never"),
    ("startsecs = -1", "programs.web.startsecs: must be a number >= 0"),
    ('startsecs = "1"', "programs.web.startsecs: expected a number, got a string"),
    ("startretries = 1.5", "programs.web.startretries: expected an integer, got a number"),
    ("startretries = true", "programs.web.startretries: expected an integer, got a boolean"),
    ("autostart = 1", "programs.web.autostart: expected true or false, got an integer"),
    ("exitcodes = [0, 256]", "programs.web.exitcodes[1]: must be <= 255"),
    ("exitcodes = 0", "programs.web.exitcodes: expected an array of integers"),
    ("backoff = { initial = 5.0, max = 1.0 }", "programs.web.backoff.max: must be >= initial"),
    ("backoff = { factor = 0.5 }", "programs.web.backoff.factor: must be a number >= 1"),
    ("backoff = { jitter = 1 }", "programs.web.backoff.jitter: unknown key"),
    ('stopsignal = "SIGNOPE"', "programs.web.stopsignal: unknown signal 'SIGNOPE'"),
    ("stopsignal = 99", "programs.web.stopsignal: not a signal number: 99"),
    ("stdout_maxbytes = \"lots\"", "programs.web.stdout_maxbytes: expected a size in bytes"),
    ("environment = { A = 1 }", "programs.web.environment.A: expected a string, got an integer"),
    ('container = "nowhere"', "programs.web.container: "),
    ("colour = 1", "programs.web.colour: unknown key"),
    ("command = []", "programs.web.command: expected a non-empty array of strings"),
    ('command = ["", "x"]', "programs.web.command[0]: must not be empty"),
    ("command = [1]", "programs.web.command[0]: expected a string, got an integer"),
]


@pytest.mark.parametrize(("line", "message"), BAD)
def test_every_error_names_table_and_key(base: Path, line: str, message: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.loads(f'[programs.web]\ncommand = ["/bin/true"]\n{line}\n'.replace(
            'command = ["/bin/true"]\ncommand', "command"), base)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[programs.web]\nautostart = true\n", "programs.web.command: missing"),
        ('[supervisor]\nsockets = "x"\n', "supervisor.sockets: unknown key"),
        ('[supervisor]\nsocket_group = "no-such-group-here"\n', "supervisor.socket_group: no such group"),
        ("[supervisor]\nsocket = 3\n", "supervisor.socket: expected a string"),
        ('[programs."we b"]\ncommand = ["x"]\n', "programs.we b: program names"),
        ("programs = 3\n", "programs: expected a table"),
        ("[extra]\n", "extra: unknown key"),
        ("[programs\n", "invalid TOML"),
    ],
)
def test_table_level_errors(base: Path, text: str, message: str) -> None:
    with pytest.raises(c.ConfigError, match=None) as e:
        c.loads(text, base)
    assert message in str(e.value)


def test_absurd_nesting_is_a_config_error(base: Path) -> None:
    with pytest.raises(c.ConfigError, match=r"nested too deeply|invalid TOML"):
        c.loads("a = " + "[" * 100_000 + "]" * 100_000, base)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(c.ConfigError, match="cannot read"):
        c.load(tmp_path / "missing.toml")


toml_scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True),
                         st.text(max_size=20))
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(sorted(c._PROGRAM_KEYS | {"bogus"}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(keys, toml_values, max_size=8),
       st.dictionaries(st.sampled_from(sorted(c._SUPERVISOR_KEYS)), toml_values, max_size=3),
       st.text(max_size=12))
def test_fuzzed_configs_give_config_errors_only(base: Path, prog: dict[str, Any], sup: dict[str, Any],
                                               name: str) -> None:
    doc = {"supervisor": sup, "programs": {name: prog}}
    try:
        cfg = c.parse(doc, base)
    except c.ConfigError as e:
        assert str(e) and "\n" not in str(e).replace(repr("\n")[1:-1], "")
    else:
        assert all(p.command for p in cfg.programs.values())


async def test_nsinitd_exits_2_on_a_bad_config_before_starting_anything(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    marker = tmp_path / "ran"
    conf.write_text(f'[supervisor]\nstate_dir = "state"\n[programs.a]\ncommand = ["touch", "{marker}"]\n'
                    '[programs.b]\ncommand = ["true"]\nautorestart = "sometimes"\n')
    with trio.fail_after(20):
        proc = await trio.run_process([sys.executable, "-m", "supervisor.daemon", "-c", str(conf), "--no-socket"],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 2
    assert b"programs.b.autorestart: expected one of always, on-failure, never" in proc.stderr
    assert proc.stdout == b""
    assert not marker.exists() and not (tmp_path / "state").exists()
