"""supervisor.toml validation: every error names table and key; nsinitd exits 2 on it."""

from __future__ import annotations

import signal
import subprocess
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
    assert cfg.supervisor.on_exit == "stop"
    assert c.loads('[supervisor]\non_exit = "keep"\n', base).supervisor.on_exit == "keep"
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


@pytest.mark.parametrize(("value", "number"), [
    ("TERM", signal.SIGTERM), ("sigint", signal.SIGINT), ("SIGUSR1", signal.SIGUSR1), ("15", 15),
    (9, 9), (int(signal.SIGRTMIN) + 2, int(signal.SIGRTMIN) + 2),
])
def test_a_signal_is_written_as_in_the_config_so_on_the_command_line(value: object, number: int) -> None:
    # one converter for supervisor.toml's stopsignal and `nsinitctl signal`, on the runtime's table
    assert c.parse_signal("signal", value) == number


@pytest.mark.parametrize(("value", "message"), [
    ("BOGUS", "signal: unknown signal 'BOGUS'"), ("99", "signal: unknown signal '99'"),
    (0, "signal: not a signal number: 0"), (True, "signal: expected a string, got a boolean"),
])
def test_what_names_no_signal_is_refused_with_the_key(value: object, message: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.parse_signal("signal", value)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[programs.web]\nautostart = true\n", "programs.web.command: missing"),
        ('[supervisor]\nsockets = "x"\n', "supervisor.sockets: unknown key"),
        ('[supervisor]\non_exit = "leave"\n', "supervisor.on_exit: expected one of stop, keep"),
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


# -- configs that could never start: --check says so, one line naming program and field ----------


def check(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.nsinitd", "-c", str(conf), "--check"],
                          capture_output=True, text=True, timeout=30)


def box(root: Path, name: str, text: str) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "container.json").write_text(text)
    return root / name


def test_check_refuses_a_container_json_that_is_not_json(tmp_path: Path) -> None:
    web = box(tmp_path, "web", '{"hostname": "web",}')
    conf = tmp_path / "n.toml"
    conf.write_text('[programs.web]\ncontainer = "web"\ncommand = ["sh"]\n')
    result = check(conf)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"nsinitd: programs.web.container: {web}/container.json: malformed JSON: "
                             f"Expecting property name enclosed in double quotes at line 1 column 20\n")


def test_check_refuses_a_container_json_with_a_bad_field(tmp_path: Path) -> None:
    web = box(tmp_path, "web", '{"cgroups": {"name": 3}}')
    conf = tmp_path / "n.toml"
    conf.write_text('[programs.web]\ncontainer = "web"\ncommand = ["sh"]\n')
    result = check(conf)
    assert result.returncode == 2
    assert result.stderr == (f"nsinitd: programs.web.container: {web}/container.json: cgroups.name: "
                             f"expected a string, got integer\n")


def test_check_refuses_two_programs_with_one_fixed_cgroup_name(tmp_path: Path) -> None:
    box(tmp_path, "a", '{"cgroups": {"name": "shared"}}')
    box(tmp_path, "b", '{"cgroups": {"name": "shared"}}')
    box(tmp_path, "c", '{"cgroups": {"name": "shared", "parent": "elsewhere"}}')  # another cgroup: fine
    conf = tmp_path / "n.toml"
    conf.write_text("".join(f'[programs.{n}]\ncontainer = "{n}"\ncommand = ["sh"]\n' for n in "abc"))
    result = check(conf)
    assert result.returncode == 2
    assert result.stderr == ('nsinitd: programs.b.container: cgroups.name "nsinit/shared" is programs.a\'s too: '
                             "two containers cannot share one cgroup\n")


def test_a_socket_path_too_long_for_a_unix_socket_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    conf = tmp_path / "n.toml"
    sock = tmp_path / ("s" * 100 + ".sock")
    conf.write_text(f'[supervisor]\nsocket = "{sock.name}"\nlog_dir = "logs"\nstate_dir = "state"\n'
                    '[programs.p]\ncommand = ["true"]\n')
    result = check(conf)
    message = (f"nsinitd: supervisor.socket: {sock} is {len(str(sock))} bytes long; "
               f"a unix socket path holds at most 107\n")
    assert (result.returncode, result.stderr) == (2, message)
    run = subprocess.run([sys.executable, "-m", "supervisor.nsinitd", "-c", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode, run.stderr) == (2, message)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "state").exists()


def test_check_refuses_a_state_dir_inside_a_programs_rootfs(tmp_path: Path) -> None:
    web = box(tmp_path, "web", "{}")
    conf = tmp_path / "n.toml"
    conf.write_text('[supervisor]\nstate_dir = "web/run/nsinit"\n'
                    '[programs.web]\ncontainer = "web"\ncommand = ["sh"]\n')
    result = check(conf)
    assert result.returncode == 2
    assert result.stderr == (f"nsinitd: supervisor.state_dir: {web}/run/nsinit is inside programs.web's rootfs "
                             f"{web}: a container could forge nsinitd's records there\n")
