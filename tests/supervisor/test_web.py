"""nsinitd's web side ([web]): the status page, actions and their guards, /metrics, /events, /healthz,
against a real nsinitd process listening on a free loopback port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import ConfigError
from tests.conftest import make_busybox_rootfs
from tests.supervisor.test_daemon_process import Nsinitd

ConfigWriter = Any
TOKEN = "s3cret-token-for-tests"

PROGRAMS = """
    [programs.web]
    command = ["sleep", "300"]
    startsecs = 0.2
    [programs.worker]
    command = ["sleep", "300"]
    startsecs = 0.2
    [programs.idle]
    command = ["sleep", "300"]
    autostart = false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Web:
    daemon: Nsinitd
    port: int

    async def request(self, method: str, path: str, headers: Mapping[str, str] | None = None,
                      body: bytes | None = None) -> Reply:
        def call() -> Reply:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request(method, path, body=body, headers=dict(headers or {}))
                r = conn.getresponse()
                return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
            finally:
                conn.close()

        return await trio.to_thread.run_sync(call)

    async def state(self, name: str) -> str:
        states = {p["name"]: p["state"] for p in (await self.request("GET", "/status.json")).json()}
        return str(states[name])


def web_table(port: int, token_file: Path | None) -> str:
    if token_file is None:
        return f'[web]\nlisten = "127.0.0.1:{port}"\nauth = "none"\n'
    return f'[web]\nlisten = "127.0.0.1:{port}"\nauth = "token"\ntoken_file = "{token_file}"\n'


def token_file(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "web.token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


@pytest.fixture
async def web(cfg: ConfigWriter, nursery: trio.Nursery) -> AsyncIterator[Callable[..., Awaitable[Web]]]:
    """``await web(auth="token"|"none")``: a real nsinitd with [web] on a free loopback port,
    answering once its ``web.started`` event and the autostart programs' ``program.running`` are out."""
    procs: list[trio.Process] = []

    async def start(auth: str = "token", programs: str = PROGRAMS, extra: str = "", control: bool = False) -> Web:
        """``control``: nsinitd also listens on its control socket (cfg.root / "nsinitd.sock")."""
        port = free_port()
        path = cfg.write(programs + "\n" + web_table(port, token_file(cfg.root) if auth == "token" else None) + extra)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "supervisor.nsinitd", "-c", str(path), *([] if control else ["--no-socket"])],
            stdout=subprocess.PIPE)
        procs.append(proc)
        d = Nsinitd(proc)
        await d.wait_for("web.started")
        for name in ("web", "worker"):
            if f"[programs.{name}]" in programs:
                await d.wait_for("program.running", name)
        return Web(d, port)

    yield start
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await p.wait()
        if p.returncode is None:
            p.kill()
            with trio.move_on_after(5):
                await p.wait()


FORM = {"content-type": "application/x-www-form-urlencoded"}
BROWSER = {**FORM, "accept": "text/html,application/xhtml+xml"}


# -- the config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "error"), [
    ('listen = "localhost:9001"\nauth = "none"',
     "web.listen: 'localhost' is not an IP address (127.0.0.1, [::1], or one of this host's)"),
    ('listen = "127.0.0.1"\nauth = "none"',
     "web.listen: expected \"HOST:PORT\" or a unix socket path, got '127.0.0.1'"),
    ('listen = "127.0.0.1:70000"\nauth = "none"', "web.listen: port must be 1-65535, got 70000"),
    ('listen = "0.0.0.0:9001"\nauth = "none"',
     'web.auth: "none" is allowed only on 127.0.0.1, ::1 or a unix socket, not 0.0.0.0'),
    ('listen = "127.0.0.1:9001"', 'web.token_file: missing (auth = "token" reads the token from this file)'),
    ('listen = "127.0.0.1:9001"\nauth = "basic"', "web.auth: expected one of token, none"),
    ('listen = "127.0.0.1:9001"\nauth = "none"\nport = 1',
     "web.port: unknown key (expected one of auth, listen, max_connections, token_file)"),
    ('listen = "127.0.0.1:9001"\nauth = "none"\nmax_connections = 0', "web.max_connections: must be >= 1, got 0"),
    ('listen = "127.0.0.1:9001"\nauth = "none"\nmax_connections = "9"',
     "web.max_connections: expected an integer, got a string"),
])
def test_a_bad_web_table_is_refused_naming_its_key(cfg: ConfigWriter, table: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg.load(f"[web]\n{table}\n")
    assert str(e.value) == error


def test_a_token_file_readable_by_group_or_others_is_refused(cfg: ConfigWriter, tmp_path: Path) -> None:
    path = token_file(tmp_path, 0o640)
    with pytest.raises(ConfigError) as e:
        cfg.load(web_table(9001, path))
    assert str(e.value) == f"web.token_file: {path}: mode 0640 lets group or others read it; chmod 600 it"


def test_nsinitd_check_validates_the_web_table(cfg: ConfigWriter, tmp_path: Path) -> None:
    path = cfg.write(web_table(9001, token_file(tmp_path, 0o644)))
    r = subprocess.run([sys.executable, "-m", "supervisor.nsinitd", "-c", str(path), "--check"],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (2, f"nsinitd: web.token_file: {tmp_path}/web.token: mode 0644 lets group "
                                           "or others read it; chmod 600 it\n")


def test_nsinitd_without_web_imports_none_of_it() -> None:
    code = ("import sys, supervisor.daemon, supervisor.server; "
            "print(sorted(m for m in ('hypercorn', 'starlette', 'prometheus_client') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert r.stdout == "[]\n"


# -- pages and actions -----------------------------------------------------------------------------


async def test_the_page_lists_every_program_in_a_plain_table(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("GET", "/")
    page = r.body.decode()
    assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta name=viewport content="width=device-width, initial-scale=1">' in page
    for name, state in (("web", "RUNNING"), ("worker", "RUNNING"), ("idle", "STOPPED")):
        assert f'<tr id="p-{name}" class="{state}"><td><a href="/program/{name}">{name}</a></td>' \
               f"<td class=state>{state}</td>" in page
    assert '<input type=password name=token' in page


async def test_a_stop_without_the_token_is_refused_and_reported(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("POST", "/program/web/stop")
    assert (r.status, r.json()) == (401, {"ok": False, "error": {"code": "refused", "message": (
        "permission denied: the token is missing (Authorization: Bearer, or the page's token field)")}})
    event = await w.daemon.wait_for("web.refused")
    assert (event["method"], event["path"], event["reason"]) == ("POST", "/program/web/stop", "no-token")
    r = await w.request("POST", "/program/web/stop", {"authorization": "Bearer wrong"})
    assert (r.status, r.json()["error"]["message"]) == (403, "permission denied: wrong token")
    assert await w.state("web") == "RUNNING"


async def test_a_wrong_token_is_reported_as_such(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("POST", "/all/stop", {"authorization": "Bearer not-it"})
    assert (r.status, r.json()["error"]["message"]) == (403, "permission denied: wrong token")
    event = await w.daemon.wait_for("web.refused")
    assert (event["method"], event["path"], event["reason"], event["suppressed"]) == ("POST", "/all/stop",
                                                                                       "wrong-token", 0)
    assert event["client"].startswith("127.0.0.1:")
    assert [await w.state(name) for name in ("web", "worker")] == ["RUNNING", "RUNNING"]


def test_refusals_are_reported_at_most_10_a_second_and_the_rest_counted_in_the_next() -> None:
    from supervisor.web import _RateLimit

    now = [100.0]
    limit = _RateLimit(10, clock=lambda: now[0])
    assert [limit.take() for _ in range(12)] == [0] * 10 + [None, None]  # a burst: 10, then quiet
    now[0] += 0.0625  # not yet a report's worth of time (0.1 s)
    assert limit.take() is None
    now[0] += 0.0625
    assert limit.take() == 3  # the three suppressed since the last report
    assert limit.take() is None
    now[0] += 60  # a long quiet time fills the bucket to 10, no more
    assert [limit.take() for _ in range(11)] == [1] + [0] * 9 + [None]


async def test_a_cross_site_post_is_refused_even_with_the_token(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("POST", "/program/web/stop", {**BROWSER, "origin": "http://evil.example"},
                        f"token={TOKEN}".encode())
    assert (r.status, b"permission denied: a request from http://evil.example (not this server&#x27;s page)"
            in r.body) == (403, True)
    r = await w.request("POST", "/program/web/stop", {"authorization": f"Bearer {TOKEN}",
                                                      "sec-fetch-site": "cross-site"})
    assert (r.status, r.json()["error"]["message"]) == (403, "permission denied: a cross-site request (Sec-Fetch-Site)")
    assert (await w.daemon.wait_for("web.refused"))["reason"] == "cross-site"
    assert await w.state("web") == "RUNNING"


async def test_a_rebound_host_name_is_refused(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none")
    r = await w.request("GET", "/status.json", {"host": f"attacker.example:{w.port}"})
    assert (r.status, r.body) == (403, f"permission denied: Host 'attacker.example:{w.port}' is not this "
                                       "server's address\n".encode())
    assert (await w.daemon.wait_for("web.refused"))["reason"] == "host"


async def test_actions_with_the_token_answer_like_nsinitctl(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    bearer = {"authorization": f"Bearer {TOKEN}"}
    r = await w.request("POST", "/program/web/stop", bearer)
    assert (r.status, r.json()["ok"], r.json()["result"]["state"]) == (200, True, "STOPPED")
    assert await w.state("web") == "STOPPED"
    r = await w.request("POST", "/program/web/stop", bearer)
    assert (r.status, r.json()["error"]) == (409, {"code": "bad_state", "message": "not running"})
    r = await w.request("POST", "/program/worker/start", bearer)
    assert (r.status, r.json()["error"]) == (409, {"code": "bad_state", "message": "already started"})
    r = await w.request("POST", "/program/nope/start", bearer)
    assert (r.status, r.json()["error"]) == (404, {"code": "no_such_program", "message": "no such program: nope"})
    r = await w.request("POST", "/program/worker/signal", {**bearer, **FORM}, b"signal=BOGUS")
    assert (r.status, r.json()["error"]["message"]) == (400, "signal: unknown signal 'BOGUS'")
    r = await w.request("POST", "/program/worker/signal", {**bearer, **FORM}, b"signal=TERM")
    assert r.status == 200
    await w.daemon.wait_for("program.exited", "worker")
    # the page's own form: the token as a field, answered by a redirect back to the page
    r = await w.request("POST", "/program/web/start", {**BROWSER, "origin": f"http://127.0.0.1:{w.port}",
                                                       "sec-fetch-site": "same-origin"}, f"token={TOKEN}".encode())
    assert (r.status, r.headers["location"]) == (303, "/")
    assert await w.state("web") == "RUNNING"


async def test_a_program_page_shows_its_recent_output(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none", programs="""
        [programs.talker]
        command = ["sh", "-c", "echo 'hello <from> talker'; exec sleep 300"]
        startsecs = 0.2
    """)
    await w.daemon.wait_for("program.running", "talker")
    with trio.fail_after(10):
        while b"hello &lt;from&gt; talker" not in (r := await w.request("GET", "/program/talker")).body:
            await w.daemon.wait_for("program.running", "talker")  # nothing new: the output is on its way
            await trio.sleep(0.05)
    assert r.status == 200
    r = await w.request("GET", "/program/nope")
    assert (r.status, r.body) == (404, b"no such program: nope\n")


# -- metrics, health and events --------------------------------------------------------------------


async def test_metrics_parse_and_say_what_the_programs_do(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none")
    await w.request("POST", "/program/worker/signal", FORM, b"signal=KILL")
    await w.daemon.wait_for("program.running", "worker", count=2)
    r = await w.request("GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    assert {"nsinit_program_state", "nsinit_program_restarts", "nsinit_program_uptime_seconds",
            "nsinit_program_exits", "nsinit_events", "nsinit_program_cpu_seconds",
            "nsinit_program_memory_bytes"} <= families.keys()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("nsinit_program_state", (("program", "web"), ("state", "RUNNING")))] == 1
    assert samples[("nsinit_program_state", (("program", "web"), ("state", "STOPPED")))] == 0
    assert samples[("nsinit_program_state", (("program", "idle"), ("state", "STOPPED")))] == 1
    assert samples[("nsinit_program_exits_total", (("cause", "signal"), ("program", "worker")))] == 1
    assert samples[("nsinit_program_restarts_total", (("program", "worker"),))] == 1
    assert samples[("nsinit_events_total", (("event", "program.running"),))] == 3
    assert samples[("nsinit_program_uptime_seconds", (("program", "idle"),))] == 0
    assert samples[("nsinit_program_uptime_seconds", (("program", "web"),))] > 0
    assert families["nsinit_program_state"].type == "gauge" and families["nsinit_program_exits"].type == "counter"


async def _open_events(port: int, query: str, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(f"GET /events{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return stream


async def test_events_stream_live_filtered_by_program(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none")
    stream = await _open_events(w.port, "?program=worker")
    async with stream:
        buf = b""
        with trio.fail_after(10):
            while b": nsinitd events\n\n" not in buf:  # subscribed: what follows is live
                buf += await stream.receive_some(65536)
            assert buf.startswith(b"HTTP/1.1 200 ") and b"content-type: text/event-stream" in buf.lower()
            await w.request("POST", "/program/web/stop")
            await w.request("POST", "/program/worker/stop")
            while b'"event":"program.stopped"' not in buf:
                buf += await stream.receive_some(65536)
    events = [json.loads(line[6:]) for line in buf.split(b"\n") if line.startswith(b"data: ")]
    assert [(e["event"], e["program"]) for e in events] == [("program.stopping", "worker"),
                                                             ("program.exited", "worker"),
                                                             ("program.stopped", "worker")]


async def test_events_since_replays_the_event_log_then_follows_live(
        web: Callable[..., Awaitable[Web]], cfg: ConfigWriter) -> None:
    w = await web(auth="none")
    r = await w.request("GET", "/events?since=yesterday")
    assert (r.status, r.body) == (400, b"since: expected RFC 3339 (2026-11-28T00:10:00Z) or 10m/2h/1d, "
                                       b"got 'yesterday'\n")
    reader = EventReader(await _open_events(w.port, "?since=1h&program=worker"))
    async with reader.stream:
        with trio.fail_after(10):
            await reader.subscribed()
            await w.request("POST", "/program/worker/stop")
            seen = await reader.until("program.stopped", "worker")
    logged = [json.loads(line) for line in (cfg.root / "events.jsonl").read_text().splitlines()]
    # the log's events of worker from nsinitd's start, then those of the stop: none twice, none missed
    assert seen == [e for e in logged if e.get("program") == "worker"]
    assert [e["event"] for e in seen][:2] == ["program.starting", "program.running"]
    assert [e["event"] for e in seen][-3:] == ["program.stopping", "program.exited", "program.stopped"]


async def test_stalled_event_readers_leave_healthz_answering_within_100ms(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none", programs="""
        [programs.flapper]
        command = ["false"]
        startsecs = 0
        autorestart = "always"
        backoff = { initial = 0.0, factor = 1.0, max = 0.0 }
        startretries = 1000000
    """)
    stalled = [await _open_events(w.port, "", rcvbuf=1024) for _ in range(20)]
    try:
        await w.daemon.wait_for("program.exited", "flapper", count=200, timeout=30)  # a flood goes by unread
        for _ in range(20):
            t0 = time.monotonic()
            r = await w.request("GET", "/healthz")
            assert (r.status, r.body) == (200, b"ok\n")
            assert time.monotonic() - t0 < 0.1
    finally:
        for s in stalled:
            await s.aclose()


FLOOD_PROGRAMS = """
    [programs.flapper]
    command = ["sleep", "0.05"]
    startsecs = 0
    autorestart = "always"
    backoff = { initial = 0.0, factor = 1.0, max = 0.0 }
    startretries = 1000000
    [programs.web]
    command = ["sleep", "300"]
    startsecs = 0.2
"""


def probe_latencies(port: int, control_socket: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds each answer took: ``nsinitctl status``'s call over the control socket (a fresh
    connection each time, as nsinitctl makes) and a GET /healthz on a fresh connection, taken in
    turn, ``rounds`` of each. Each answer is checked, not only timed."""
    from supervisor.ctl.client import Client

    status: list[float] = []
    healthz: list[float] = []
    for _ in range(rounds):
        t0 = time.monotonic()
        with Client(os.fspath(control_socket), timeout=10) as client:
            programs = client.call("status")
        status.append(time.monotonic() - t0)
        assert [p["name"] for p in programs] == ["flapper", "web"]
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, b"ok\n")
        finally:
            conn.close()
        healthz.append(time.monotonic() - t0)
    return status, healthz


class EventReader:
    """The events of a raw ``GET /events`` answer: the head, then HTTP/1.1 chunks of ``data:`` lines."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.text = b""  # the body, unchunked, not yet parsed into events
        self.events: list[dict[str, Any]] = []
        self.more = trio.Event()  # set at the next event (then replaced)

    async def _more(self) -> None:
        chunk = await self.stream.receive_some(65536)
        assert chunk, f"the event stream ended after {len(self.events)} events: {self.events[-3:]}"
        self.buf += chunk

    async def subscribed(self) -> None:
        """Until the server's opening comment: it has subscribed, what follows is live."""
        while b"\r\n\r\n" not in self.buf:
            await self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
        await self._unchunk_until(lambda: b": nsinitd events\n\n" in self.text)
        self.text = self.text.partition(b": nsinitd events\n\n")[2]

    async def _unchunk_until(self, done: Callable[[], bool]) -> None:
        while not done():
            while b"\r\n" not in self.buf:
                await self._more()
            size = int(self.buf.split(b"\r\n", 1)[0], 16)
            while len(self.buf) < self.buf.index(b"\r\n") + 2 + size + 2:
                await self._more()
            start = self.buf.index(b"\r\n") + 2
            self.text += self.buf[start:start + size]
            self.buf = self.buf[start + size + 2:]

    async def until(self, event: str, program: str) -> list[dict[str, Any]]:
        """Every event through the first ``event`` of ``program``."""
        while not self.events or (self.events[-1]["event"], self.events[-1].get("program")) != (event, program):
            await self._unchunk_until(lambda: b"\n\n" in self.text)
            block, _, self.text = self.text.partition(b"\n\n")
            assert block.startswith(b"data: "), block
            self.events.append(json.loads(block[6:]))
            self.more.set()
            self.more = trio.Event()
        return self.events


async def test_a_flood_leaves_status_and_healthz_answering_within_100ms_and_loses_no_event(
        web: Callable[..., Awaitable[Web]], cfg: ConfigWriter) -> None:
    """300 idle connections, an /events reader that never reads, and 96 clients asking for the
    page, /status.json and /metrics as fast as they are answered, while a program flaps (200
    events and more): the control socket's status and /healthz each answer within 100 ms (the
    worst of 20 probes of each taken meanwhile), and a reading /events client gets every event of
    the event log, in order."""
    w = await web(auth="none", programs=FLOOD_PROGRAMS, control=True)
    log = cfg.root / "events.jsonl"
    stalled = await _open_events(w.port, "", rcvbuf=1024)
    reader = EventReader(await _open_events(w.port, ""))
    idle: list[trio.SocketStream] = []
    flood: trio.Process | None = None
    async with stalled, reader.stream:
        with trio.fail_after(10):
            await reader.subscribed()
        logged_before = len(log.read_text().splitlines())
        try:
            for i in range(300):
                s = await trio.open_tcp_stream("127.0.0.1", w.port)
                if i % 2:  # half never send a byte, half stop in the middle of a request head
                    await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                idle.append(s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader.until, "program.stopped", "web")
                flood = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "tests.supervisor.web_flood", str(w.port), "96", "/", "/status.json",
                     "/metrics"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                assert flood.stdin is not None and flood.stdout is not None
                with trio.fail_after(60):
                    said = b""
                    while b"on\n" not in said:  # every flood client has been answered: it is on
                        said += await flood.stdout.receive_some(65536)
                    started = time.monotonic()
                    status, healthz = await trio.to_thread.run_sync(
                        probe_latencies, w.port, cfg.root / "nsinitd.sock", 20)
                    ended = time.monotonic()
                    while sum(e["program"] == "flapper" for e in reader.events) < 200:  # the flood goes on
                        await reader.more.wait()
                    await flood.stdin.aclose()
                    while not said.endswith(b"}\n"):
                        chunk = await flood.stdout.receive_some(65536)
                        assert chunk, "the flood ended without its summary"
                        said += chunk
                    assert await flood.wait() == 0
                    summary = json.loads(said.split(b"\n")[1])
                    r = await w.request("POST", "/program/web/stop")  # the last event the reader waits for
                    assert r.status == 200
        finally:
            if flood is not None and flood.returncode is None:
                flood.kill()
                await flood.wait()
            for s in idle:
                await s.aclose()
    assert summary["statuses"] == {"200": len(summary["times"])}
    # the flood went on while the probes were taken: each client was answered at least once meanwhile
    assert sum(started <= t <= ended for t in summary["times"]) >= 96
    assert max(status) < 0.1, f"nsinitctl status took {max(status) * 1000:.0f} ms at worst: {status}"
    assert max(healthz) < 0.1, f"/healthz took {max(healthz) * 1000:.0f} ms at worst: {healthz}"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    first = logged.index(reader.events[0])
    assert first <= logged_before  # the reader's first event was logged before the flood began
    assert reader.events == logged[first:first + len(reader.events)]
    assert sum(e.get("program") == "flapper" for e in logged[logged_before:]) >= 200


async def test_a_unix_socket_listener_is_root_only_and_removed_at_exit(cfg: ConfigWriter) -> None:
    path = cfg.root / "web.sock"
    config = cfg.write(PROGRAMS + f'\n[web]\nlisten = "{path}"\nauth = "none"\n')
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "supervisor.nsinitd", "-c", str(config), "--no-socket"], stdout=subprocess.PIPE)
    d = Nsinitd(proc)
    try:
        await d.wait_for("web.started")
        assert os.stat(path).st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(os.fspath(path))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\nok\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await d.finish() == 0
    assert not path.exists()


async def test_an_address_in_use_exits_1_before_any_program_starts(cfg: ConfigWriter) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = cfg.write(PROGRAMS + web_table(port, None))
        with trio.fail_after(30):
            r = await trio.run_process([sys.executable, "-m", "supervisor.nsinitd", "-c", str(config), "--no-socket"],
                                       capture_stdout=True, capture_stderr=True, check=False)
    assert (r.returncode, r.stderr.decode()) == (
        1, f"nsinitd: web.listen 127.0.0.1:{port}: bind: EADDRINUSE (Address already in use)\n")
    assert b"program." not in r.stdout


# -- the page's columns and the actions on all -----------------------------------------------------


async def test_the_page_shows_each_programs_cpu_and_memory_from_its_cgroup(
        web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none")
    rows = {p["name"]: p for p in (await w.request("GET", "/status.json")).json()}
    # cpu.stat is in every cgroup; memory.current only where the memory controller is enabled
    assert isinstance(rows["web"]["cpu_seconds"], float)
    assert rows["web"]["memory_bytes"] is None or rows["web"]["memory_bytes"] > 0
    idle = rows["idle"]
    assert (idle["cpu_seconds"], idle["memory_bytes"], idle["oom_killed"]) == (None, None, False)
    page = (await w.request("GET", "/")).body.decode()
    assert "<th class=opt>cpu</th><th class=opt>memory</th>" in page
    assert f'<td class="cpu opt num">{rows["web"]["cpu_seconds"]:.2f} s</td>' in page
    assert '<td class="cpu opt num"></td><td class="mem opt num"></td>' in page  # idle: no cgroup


@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_a_container_killed_for_memory_says_oom_in_its_event_metrics_and_row(
        web: Callable[..., Awaitable[Web]], tmp_path: Path) -> None:
    # 16 MiB and no swap; tail keeps its line in memory, and /dev/zero has no newline: it grows
    # until the kernel's OOM killer ends it, in the container's memory cgroup
    rootfs = make_busybox_rootfs(tmp_path / "bb", {"cgroups": {"memory": 16 << 20, "memory_swap": 16 << 20}})
    w = await web(auth="none", programs=f"""
        [programs.hog]
        container = "{rootfs}"
        command = ["tail", "/dev/zero"]
        startsecs = 0
        autorestart = "never"
    """)
    exited = await w.daemon.wait_for("program.exited", "hog", timeout=30)
    assert (exited["signal"], exited["exit_code"], exited["oom_killed"]) == ("SIGKILL", 137, True)
    await w.daemon.wait_for("container.destroyed", "hog")
    families = {f.name: f for f in text_string_to_metric_families((await w.request("GET", "/metrics")).body.decode())}
    exits = {tuple(sorted(s.labels.items())): s.value for s in families["nsinit_program_exits"].samples
             if s.name == "nsinit_program_exits_total"}
    assert exits == {(("cause", "oom"), ("program", "hog")): 1.0}
    row = {p["name"]: p for p in (await w.request("GET", "/status.json")).json()}["hog"]
    assert (row["state"], row["signal"], row["oom_killed"]) == ("EXITED", "SIGKILL", True)
    page = (await w.request("GET", "/")).body.decode()
    assert '<tr id="p-hog" class="EXITED">' in page and '<td class="exit opt">SIGKILL (OOM)</td>' in page


def test_last_exit_shows_the_code_or_signal_and_an_oom_kill() -> None:
    from supervisor.api import ProgramStatus
    from supervisor.web import last_exit

    def status(code: int | None, sig: str | None) -> ProgramStatus:
        return ProgramStatus("p", "EXITED", None, 0.0, code, sig, 0, None)

    assert [last_exit(status(3, None), False), last_exit(status(137, "SIGKILL"), False),
            last_exit(status(137, "SIGKILL"), True), last_exit(status(None, None), False)] == \
           ["3", "SIGKILL", "SIGKILL (OOM)", ""]


def test_all_picks_the_programs_nsinitctls_all_picks() -> None:
    from supervisor.ctl.commands import _ACTIONS, SIGNAL_PICKS
    from supervisor.web import ALL_PICKS

    assert dict(ALL_PICKS) == {**{action: picked for action, (_, _, picked) in _ACTIONS.items()},
                               "signal": SIGNAL_PICKS}


async def test_stop_all_and_start_all_act_on_the_programs_nsinitctl_would(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("POST", "/all/stop")
    assert (r.status, r.json()["error"]["code"]) == (401, "refused")
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = await w.request("POST", "/all/stop", auth)
    assert r.status == 200 and [(p["name"], p["state"]) for p in r.json()["result"]] == \
        [("worker", "STOPPED"), ("web", "STOPPED")]  # the reverse of the order they start in; idle was stopped
    r = await w.request("POST", "/all/stop", auth)
    assert (r.status, r.json()) == (200, {"ok": True, "result": []})
    r = await w.request("POST", "/all/start", auth)
    assert r.status == 200 and [(p["name"], p["state"]) for p in r.json()["result"]] == \
        [("idle", "RUNNING"), ("web", "RUNNING"), ("worker", "RUNNING")]
    r = await w.request("POST", "/all/bogus", auth)
    assert (r.status, r.json()["error"]["message"]) == (
        404, "no such action for all: bogus (one of start, stop, restart, signal)")


async def test_signal_all_signals_every_running_program_like_nsinitctl(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web()
    r = await w.request("POST", "/all/signal", FORM, b"signal=TERM")
    assert (r.status, r.json()["error"]["code"]) == (401, "refused")
    auth = {"authorization": f"Bearer {TOKEN}", **FORM}
    r = await w.request("POST", "/all/signal", auth, b"signal=BOGUS")
    assert (r.status, r.json()["error"]) == (400, {"code": "bad_request", "message": "signal: unknown signal 'BOGUS'"})
    assert [e for e in w.daemon.events if e["event"] == "program.exited"] == []
    r = await w.request("POST", "/all/signal", auth, b"signal=TERM")
    # nsinitctl signal TERM all --json answers the same list; idle (STOPPED) is not picked
    assert (r.status, r.json()) == (200, {"ok": True, "result": [{"name": "web", "signal": "SIGTERM"},
                                                                  {"name": "worker", "signal": "SIGTERM"}]})
    for name in ("web", "worker"):
        exited = await w.daemon.wait_for("program.exited", name)
        assert (exited["signal"], exited["exit_code"]) == ("SIGTERM", 143)
        await w.daemon.wait_for("program.running", name, count=2)  # restarted: a signal is a failure
    assert await w.state("idle") == "STOPPED"
    r = await w.request("POST", "/all/signal?signal=1", {"authorization": f"Bearer {TOKEN}"})  # or in the query
    assert (r.status, [p["signal"] for p in r.json()["result"]]) == (200, ["SIGHUP", "SIGHUP"])


async def test_300_idle_connections_leave_healthz_answering_within_100ms(web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none")
    idle: list[trio.SocketStream] = []
    try:
        for i in range(300):
            s = await trio.open_tcp_stream("127.0.0.1", w.port)
            if i % 2:  # half never send a byte, half stop in the middle of a request head
                await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            idle.append(s)
        for _ in range(20):
            t0 = time.monotonic()
            r = await w.request("GET", "/healthz")
            assert (r.status, r.body) == (200, b"ok\n")
            assert time.monotonic() - t0 < 0.1
    finally:
        for s in idle:
            await s.aclose()


def healthz_once_a_connection_is_taken(port: int) -> list[tuple[int, bytes]]:
    """Connect until the server takes the connection (each 503 comes at once, until it has read the
    closes' EOF), then ask /healthz 20 times on it; each answer must come within 100 ms. Trying
    for 3 s at most: well before the 5 s after which an idle connection would be closed anyway,
    so a slot kept until then fails here."""
    deadline = time.monotonic() + 3
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            body = r.read()
            if r.status == 503 and time.monotonic() < deadline:
                continue
            answers = [(r.status, body)]
            for _ in range(19):
                t0 = time.monotonic()
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                answers.append((r.status, r.read()))
                assert time.monotonic() - t0 < 0.1
            return answers
        finally:
            conn.close()


async def test_connections_beyond_max_connections_are_refused_and_healthz_answers_after_some_close(
        web: Callable[..., Awaitable[Web]]) -> None:
    w = await web(auth="none", extra="max_connections = 20\n")
    held: list[trio.SocketStream] = []
    try:
        for _ in range(20):
            held.append(await trio.open_tcp_stream("127.0.0.1", w.port))
        # the 21st is answered 503 at once and closed, without sending a byte of its own
        extra = await trio.open_tcp_stream("127.0.0.1", w.port)
        async with extra:
            buf = b""
            with trio.fail_after(1):
                while chunk := await extra.receive_some(65536):
                    buf += chunk
        assert buf.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert buf.endswith(b"\r\n\r\ntoo many connections (web.max_connections = 20)\n")
        for s in held[:5]:
            await s.aclose()
        del held[:5]
        answers = await trio.to_thread.run_sync(healthz_once_a_connection_is_taken, w.port)
        assert answers == [(200, b"ok\n")] * 20
    finally:
        for s in held:
            await s.aclose()


async def until_logged(path: Path, text: bytes) -> None:
    """Until the captured output file holds ``text``, woken by inotify on its directory (the
    Follower of nsinitctl logs -f and of the page)."""
    from supervisor.ctl.eventlog import Follower
    from supervisor.web import _wait_for_change

    follower = Follower(path, None)  # watching before the first read: no write slips between
    try:
        seen = b""
        with trio.fail_after(10):
            while text not in (seen := seen + follower.read()):
                await _wait_for_change(follower)
    finally:
        follower.close()


async def test_a_program_page_follows_its_output_live_through_rotation(
        web: Callable[..., Awaitable[Web]], cfg: ConfigWriter, tmp_path: Path) -> None:
    fifo = tmp_path / "say"
    os.mkfifo(fifo)
    w = await web(auth="none", programs=f"""
        [programs.talker]
        command = ["sh", "-c", "echo before; exec cat {fifo}"]
        startsecs = 0.2
        stdout_maxbytes = 100
        stdout_backups = 2
    """)
    await until_logged(cfg.root / "logs" / "talker.out", b"before\n")  # what the page's tail shows, not the stream
    stream = await trio.open_tcp_stream("127.0.0.1", w.port)
    async with stream:
        await stream.send_all(f"GET /program/talker/log/stdout HTTP/1.1\r\nHost: 127.0.0.1:{w.port}\r\n\r\n".encode())
        buf = b""
        with trio.fail_after(10):
            while b": nsinitd log\n\n" not in buf:  # following from here on
                buf += await stream.receive_some(65536)
            assert buf.startswith(b"HTTP/1.1 200 ") and b"content-type: text/event-stream" in buf.lower()
            writer = await trio.to_thread.run_sync(lambda: open(fifo, "w"))  # noqa: SIM115 - closed below
            try:
                for i in range(6):  # 6 lines of 41 bytes: the file is rotated twice on the way
                    writer.write(f"line-{i} {'x' * 33}\n")
                    writer.flush()
                    while f"data: line-{i} ".encode() not in buf:
                        buf += await stream.receive_some(65536)
            finally:
                writer.close()
    lines = [line[6:] for line in buf.split(b"\n") if line.startswith(b"data: ")]
    assert lines == [f"line-{i} {'x' * 33}".encode() for i in range(6)]
    assert (cfg.root / "logs" / "talker.out.2").exists()  # it was rotated twice
    r = await w.request("GET", "/program/talker/log/stdin")
    assert (r.status, r.body) == (404, b"no such stream: stdin (stdout or stderr)\n")
    r = await w.request("GET", "/program/nope/log/stdout")
    assert (r.status, r.body) == (404, b"no such program: nope\n")


async def test_a_followed_output_line_without_end_comes_in_64k_pieces(
        web: Callable[..., Awaitable[Web]], tmp_path: Path) -> None:
    fifo = tmp_path / "say"
    os.mkfifo(fifo)
    w = await web(auth="none", programs=f"""
        [programs.talker]
        command = ["sh", "-c", "exec cat {fifo}"]
        startsecs = 0.2
    """)
    stream = await trio.open_tcp_stream("127.0.0.1", w.port)
    async with stream:
        await stream.send_all(f"GET /program/talker/log/stdout HTTP/1.1\r\nHost: 127.0.0.1:{w.port}\r\n\r\n".encode())
        buf = b""
        with trio.fail_after(10):
            while b": nsinitd log\n\n" not in buf:
                buf += await stream.receive_some(65536)
            writer = await trio.to_thread.run_sync(lambda: open(fifo, "wb"))  # noqa: SIM115 - closed below
            with writer:
                writer.write(b"y" * 150_000)  # never a newline: not held back without bound
                writer.flush()
                while buf.count(b"\n\n") < 3:  # the head, the comment and two whole pieces
                    buf += await stream.receive_some(65536)
    pieces = [line[6:] for line in buf.split(b"\n") if line.startswith(b"data: ")]
    assert pieces[:2] == [b"y" * 65536, b"y" * 65536]
