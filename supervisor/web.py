"""nsinitd's web side (``[web]`` in the config): a status page, per-program actions, ``/metrics``,
``/healthz`` and ``/events``, served by hypercorn's per-connection server (behind an accept loop of
ours, which caps the connections) in the daemon's own nursery.

Imported only when ``[web]`` is configured: hypercorn, starlette and prometheus_client cost an
nsinitd without it nothing.

It talks to the daemon through :class:`supervisor.api.SupervisorAPI`, like the control socket, and
its actions go through the control server's own handlers (:data:`supervisor.server.CALLS`): a stop
of a stopped program is refused with the same ``not running`` whichever door it came through.

What it promises, and how:

* **Nothing changes without the token, nor from another site.** Every POST must carry the token
  (``Authorization: Bearer``, or the page's ``token`` form field) unless ``auth = "none"`` (allowed
  on loopback and unix sockets only), and must not come from another origin: a present ``Origin``
  must be this server's own, a present ``Sec-Fetch-Site`` must say ``same-origin`` or ``none``.
  Every request's ``Host`` must name the configured address (or ``localhost`` on a loopback one):
  a page whose DNS name was rebound to 127.0.0.1 can't read or post. A refusal is answered 401/403
  with one line and reported as a ``web.refused`` event (rate-limited).
* **Supervision never waits for a browser.** ``/events`` readers read from an event bus
  subscription, bounded like the control socket's: a reader that falls ``event_buffer`` behind is
  dropped, and one whose socket takes no bytes for ``send_timeout`` is disconnected. Each
  connection is its own trio task; the daemon's emit never blocks on any of them. At most
  ``max_connections`` are open at once: one more is answered 503 and closed at once. GET answers
  are computed one at a time (:meth:`WebApp.render_in_turn`): a flood of them waits parked
  instead of making every turn of the loop longer, so the control socket and /healthz keep
  answering within milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import html
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, cast
from urllib.parse import parse_qs

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from nsruntime import signal_name

from .api import ControlError, ProgramStatus, SupervisorAPI
from .config import ConfigError, WebConfig, check_token_file, parse_signal
from .ctl.errors import CtlError
from .ctl.eventlog import EventFilter, Follower, parse_since
from .server import CALLS, _bind, _remove_files
from .states import ProcessState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: what each action answers over HTTP for each ControlError code
HTTP_STATUS: Final[Mapping[str, int]] = {
    "no_such_program": 404, "bad_state": 409, "bad_request": 400, "not_a_container": 409,
    "failed": 500, "unsupported": 501, "refused": 403, "unauthorized": 401,
}
ACTIONS: Final = ("start", "stop", "restart", "signal")
_ACTIVE: Final = frozenset({"STARTING", "RUNNING", "BACKOFF", "STOPPING"})
#: the states ``POST /all/ACTION`` picks: nsinitctl's ``all`` (tests check they are the same)
ALL_PICKS: Final[Mapping[str, frozenset[str]]] = {
    "start": frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF"}),
    "stop": _ACTIVE,
    "restart": frozenset({"STOPPED", "EXITED", "FATAL", "BACKOFF", *_ACTIVE}),
    "signal": frozenset({"RUNNING"}),
}
#: the signals the page offers (any other name or number can be POSTed)
PAGE_SIGNALS: Final = ("HUP", "INT", "QUIT", "TERM", "KILL", "USR1", "USR2")
MAX_BODY = 16 * 1024
LOG_TAIL_BYTES = 64 * 1024


class WebError(Exception):
    """The web server can't start; ``str()`` is the one line nsinitd prints after the address."""


@dataclass(frozen=True)
class WebLimits:
    event_buffer: int = 1000  # events an /events reader may fall behind before it is dropped
    send_timeout: float = 10.0  # one event written to a reader whose socket takes nothing
    keep_alive_timeout: float = 5.0  # an idle keep-alive connection
    refusal_events_per_second: float = 10.0
    backlog: int = 1024
    # GET answers computed at once (the page, /status.json, /metrics ...); more wait their turn
    # parked, costing the loop nothing, instead of each lengthening every turn of it
    renders_at_once: int = 1


async def serve(
    api: SupervisorAPI,
    web: WebConfig,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    *,
    limits: WebLimits = WebLimits(),  # frozen, so sharing the default is safe
) -> None:
    """Serve until cancelled; ``task_status.started()`` once the address accepts connections.
    Raises WebError or OSError (before started) when the token or the address can't be had."""
    token: str | None = None
    if web.auth == "token":
        assert web.token_file is not None
        try:  # again: the file may have changed since the config was checked
            token = check_token_file("web.token_file", web.token_file)
        except ConfigError as e:
            raise WebError(str(e)) from None
    app = WebApp(api, web, token, limits)
    sock, cleanup = await _listen(web, limits.backlog)
    try:
        hconfig = HypercornConfig()
        hconfig.accesslog = None
        hconfig.errorlog = _LOGGER
        hconfig.loglevel = "WARNING"
        hconfig.include_server_header = False
        hconfig.keep_alive_timeout = limits.keep_alive_timeout
        hconfig.backlog = limits.backlog
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.count_events)
            await nursery.start(_accept_loop, cast(ASGIFramework, app), hconfig, sock, web.max_connections)
            api.emit("web.started", listen=web.listen)
            task_status.started()
    finally:
        sock.close()
        cleanup()


_LOGGER = logging.getLogger("nsinitd.web")
#: errors of accept() that say "not now" (out of descriptors or memory): retried after a pause
_ACCEPT_RETRY: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class _TCPServer(TCPServer):
    """hypercorn's per-connection server, letting a connection go as soon as its client has
    closed it. hypercorn's own keeps an idle connection's task (and so its slot among
    ``max_connections``) until ``keep_alive_timeout`` even after the client's EOF: a flood of
    connect-and-close (port scans, TCP health checks) would then hold every slot and /healthz
    would be answered 503."""

    async def _read_data(self) -> None:
        await super()._read_data()
        # the read side has ended: a request in progress still gets its answer (its stream holds
        # the connection); an idle connection has nothing left to wait for
        await self.idle_task.stop()


async def _accept_loop(app: ASGIFramework, hconfig: HypercornConfig, sock: socket.socket, max_connections: int,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """hypercorn's per-connection server for each accepted connection, at most ``max_connections``
    at once: one more is answered a one-line 503 and closed, so a flood of connections can't take
    every descriptor, and /healthz answers again as soon as some close. (hypercorn's own serve loop
    has no such cap; its lifespan protocol is not needed here.)"""
    hconfig.set_statsd_logger_class(StatsdLogger)
    context = WorkerContext(None)
    wrapper = ASGIWrapper(app)
    refusal = (f"too many connections (web.max_connections = {max_connections})\n").encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
               b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(refusal), refusal))
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    open_now = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_now
        try:
            # TCPServer's annotation says SSLStream; it takes a plain SocketStream as well (no TLS here)
            await _TCPServer(wrapper, hconfig, context, ConnectionState({}), stream)  # type: ignore[arg-type]
        finally:
            open_now -= 1

    async def refuse(stream: trio.SocketStream) -> None:
        with trio.move_on_after(1):  # a client that takes not even this is not waited for
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(refusal)
        await trio.aclose_forcefully(stream)

    async with listener, trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                if e.errno not in _ACCEPT_RETRY:
                    raise
                _LOGGER.warning("accept: %s; retrying in 0.1 s", os.strerror(e.errno or 0))
                await trio.sleep(0.1)
                continue
            if open_now >= max_connections:
                nursery.start_soon(refuse, stream)
                continue
            open_now += 1
            nursery.start_soon(handle, stream)


async def _listen(web: WebConfig, backlog: int) -> tuple[socket.socket, Callable[[], None]]:
    """A listening socket for the configured address, and what removes it afterwards. A unix socket
    is made like the control socket (root only, a live owner's path is never taken over)."""
    if web.path is not None:
        tsock, identity = await _bind(web.path, None, backlog)
        raw = socket.socket(fileno=os.dup(tsock.fileno()))
        tsock.close()
        path = web.path
        return raw, lambda: _remove_files(path, identity)
    assert web.host is not None and web.port is not None
    family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.bind((web.host, web.port))
        raw.listen(backlog)
    except OSError as e:
        raw.close()
        name = errno.errorcode.get(e.errno or 0, "error")
        raise WebError(f"bind: {name} ({e.strerror})") from None
    return raw, lambda: None


# -- the app ---------------------------------------------------------------------------------------


class _RateLimit:
    """A token bucket: at most ``rate`` reports a second, the rest counted as suppressed."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.stamp = clock()
        self.suppressed = 0

    def take(self) -> int | None:
        """The count suppressed since the last report, or None to suppress this one."""
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class Refused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # one word for the event
        self.message = message


class WebApp:
    """The ASGI application: the host check and ``/events`` here, the rest through starlette."""

    def __init__(self, api: SupervisorAPI, web: WebConfig, token: str | None, limits: WebLimits) -> None:
        self.api = api
        self.web = web
        self.token = token
        self.limits = limits
        self.started = time.time()
        self.events_total: Counter[str] = Counter()
        self.exits_total: Counter[tuple[str, str]] = Counter()
        self.events_missed = 0
        self.last_oom: dict[str, bool] = {}  # the last exit was an OOM kill, by program
        self._refusals = _RateLimit(limits.refusal_events_per_second)
        self.hosts = _allowed_hosts(web)
        self.rendering = trio.Semaphore(limits.renders_at_once)
        self.routes = Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/status.json", self.status_json, methods=["GET"]),
            Route("/program/{name}", self.program_page, methods=["GET"]),
            Route("/program/{name}/{action}", self.action, methods=["POST"]),
            Route("/all/{action}", self.action_all, methods=["POST"]),
        ])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if self.hosts is not None and host not in self.hosts:
                self.report(scope, "host")
                response: Response = PlainTextResponse(
                    f"permission denied: Host {host!r} is not this server's address\n", status_code=403)
                await response(scope, receive, send)
                return
            if scope["path"] == "/events" and scope["method"] == "GET":
                await self.events(scope, receive, send)
                return
            parts = scope["path"].split("/")
            if scope["method"] == "GET" and len(parts) == 5 and parts[1] == "program" and parts[3] == "log":
                await self.follow_log(parts[2], parts[4], scope, receive, send)
                return
            if scope["method"] in ("GET", "HEAD") and scope["path"] != "/healthz":
                await self.render_in_turn(scope, receive, send)
                return
        await self.routes(scope, receive, send)

    async def render_in_turn(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A GET answered once its turn comes: at most ``renders_at_once`` are computed at a time.
        A flood of them then keeps nsinitd's loop turning fast (the control socket and /healthz,
        which skips the queue, answer within milliseconds) instead of every turn running all of
        them. The turn ends when the answer is computed, before it is sent: a client that doesn't
        read can't hold it. POSTs don't wait here: an action may wait for a program (a stop for
        ``stopwaitsecs``), and without the token they are refused at once."""
        turn_over = False

        def end_turn() -> None:
            nonlocal turn_over
            if not turn_over:
                turn_over = True
                self.rendering.release()

        async def send_after_turn(message: Message) -> None:
            end_turn()
            await send(message)

        await self.rendering.acquire()
        try:
            await self.routes(scope, receive, send_after_turn)
        finally:
            end_turn()

    def report(self, scope: Scope, reason: str) -> None:
        suppressed = self._refusals.take()
        if suppressed is None:
            return
        with contextlib.suppress(Exception):  # reporting must never take the server down
            client = scope.get("client")
            self.api.emit("web.refused", method=str(scope.get("method", "")), path=str(scope.get("path", "")),
                          reason=reason, client=f"{client[0]}:{client[1]}" if client else "unix",
                          suppressed=suppressed)

    # -- read-only -------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    def rows(self, names: tuple[str, ...] = ()) -> list[Row]:
        """Each program's status with what the page adds: cgroup usage and the last exit's OOM."""
        return [Row(s, _usage(self.api, s.name), self.last_oom.get(s.name, False)) for s in self.api.status(names)]

    async def status_json(self, request: Request) -> Response:
        now = time.time()
        return JSONResponse([{**r.status.to_json(), "uptime": _uptime(r.status, now), "cpu_seconds": r.cpu_seconds,
                              "memory_bytes": r.memory_bytes, "oom_killed": r.oom_killed} for r in self.rows()])

    async def page(self, request: Request) -> Response:
        return HTMLResponse(render_page(self.rows(), self.token is not None, time.time()))

    async def program_page(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            row = self.rows((name,))[0]
            logs = {stream: _tail(self.api.log_path(name, stream)) for stream in ("stdout", "stderr")}
        except ControlError as e:
            return PlainTextResponse(f"{e.message}\n", status_code=HTTP_STATUS.get(e.code, 400))
        return HTMLResponse(render_program(row, logs, self.token is not None, time.time()))

    async def metrics(self, request: Request) -> Response:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def count_events(self) -> None:
        """Counters for /metrics, from a subscription of our own (resubscribed if ever dropped)."""
        while True:
            with self.api.subscribe(100_000) as channel:
                async for ev in channel:
                    name = str(ev.get("event"))
                    if name == "subscriber.dropped":
                        self.events_missed += 1
                        break
                    self.events_total[name] += 1
                    if name == "program.exited":
                        self.exits_total[(str(ev.get("program")), exit_cause(ev))] += 1
                        self.last_oom[str(ev.get("program"))] = bool(ev.get("oom_killed"))
                else:
                    return  # the bus closed: nsinitd is stopping

    # -- actions ---------------------------------------------------------------------------------

    async def action_all(self, request: Request) -> Response:
        """``start``, ``stop``, ``restart`` or ``signal`` of every program nsinitctl's ``all``
        would pick, one after the other (stop in reverse name order); each program's answer in
        ``results`` (for a signal ``{"name", "signal"}``, as ``nsinitctl signal --json`` prints)."""
        action = request.path_params["action"]
        form, from_page, refused = await self.guarded(request)
        if refused is not None:
            return refused
        if action not in ALL_PICKS:
            return _answer(from_page, 404, "bad_request",
                           f"no such action for all: {action} (one of {', '.join(ALL_PICKS)})")
        args: dict[str, Any] = {}
        if action == "signal":
            try:
                args["signum"] = _signal_field(request, form)
            except ConfigError as e:
                return _answer(from_page, 400, "bad_request", str(e))
        names = [s.name for s in self.api.status() if s.state in ALL_PICKS[action]]
        if action == "stop":
            names.reverse()
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        for name in names:
            try:
                result = await CALLS[action](self.api, {**args, "name": name})
                results.append({"name": name, "signal": signal_name(args["signum"])} if action == "signal"
                               else result)
            except ControlError as e:
                results.append({"name": name, "error": {"code": e.code, "message": e.message}})
                errors.append(f"{name}: {e.message}")
        if errors:
            return _answer(from_page, 409, "failed", "; ".join(errors))
        if from_page:
            return RedirectResponse("/", status_code=303)
        return JSONResponse({"ok": True, "result": results})

    async def guarded(self, request: Request) -> tuple[dict[str, str], bool, Response | None]:
        """The form, whether the page sent it, and the refusal to answer (None when allowed)."""
        body = await _body(request)
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()} if body else {}
        # a browser (the page's form) gets a page or a redirect back; anything else JSON
        from_page = "text/html" in request.headers.get("accept", "")
        try:
            self.check(request, form)
        except Refused as e:
            self.report(request.scope, e.reason)
            return form, from_page, _answer(from_page, e.status, "refused", e.message)
        return form, from_page, None

    async def action(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        form, from_page, refused = await self.guarded(request)
        if refused is not None:
            return refused
        if action not in ACTIONS:
            return _answer(from_page, 404, "bad_request", f"no such action: {action} (one of {', '.join(ACTIONS)})")
        args: dict[str, Any] = {"name": name}
        try:
            if action == "signal":
                args["signum"] = _signal_field(request, form)
            result = await CALLS[action](self.api, args)
        except ConfigError as e:
            return _answer(from_page, 400, "bad_request", str(e))
        except ControlError as e:
            return _answer(from_page, HTTP_STATUS.get(e.code, 400), e.code, e.message)
        if from_page:
            return RedirectResponse(f"/program/{name}" if form.get("back") == "program" else "/", status_code=303)
        return JSONResponse({"ok": True, "result": result})

    def check(self, request: Request, form: Mapping[str, str]) -> None:
        """Raise Refused unless the request carries the token and comes from this server's own page."""
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin != f"http://{host}":
            raise Refused(403, "cross-site", f"permission denied: a request from {origin} (not this server's page)")
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise Refused(403, "cross-site", f"permission denied: a {site} request (Sec-Fetch-Site)")
        if self.token is None:
            return
        given = form.get("token")
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not given:
            raise Refused(401, "no-token",
                          "permission denied: the token is missing (Authorization: Bearer, or the page's token field)")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refused(403, "wrong-token", "permission denied: wrong token")

    # -- /events ---------------------------------------------------------------------------------

    async def events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Server-sent events: each event object as one ``data:`` line, filtered like
        ``nsinitctl events`` (``?program=NAME`` and ``?event=PATTERN``, both repeatable, and
        ``?since=TIME``: first the event log's events from then on, then the live ones)."""
        query = parse_qs(scope.get("query_string", b"").decode("utf-8", "replace"))
        since: float | None = None
        log = self.api.event_log
        if "since" in query:
            try:
                since = parse_since(query["since"][-1])
            except CtlError as e:  # nsinitctl's words for its --since, which is our since
                error: str | None = e.message.removeprefix("--")
            else:
                error = None if log is not None else "since: nsinitd keeps no event log ([supervisor] event_log)"
            if error is not None:
                await PlainTextResponse(f"{error}\n", status_code=400)(scope, receive, send)
                return
        wanted = EventFilter(programs=frozenset(query.get("program", [])), patterns=tuple(query.get("event", [])),
                             since=since)
        with self.api.subscribe(self.limits.event_buffer) as channel:
            # The log's first ``logged`` bytes are the events before the subscription, the rest
            # come through it: taken in the same step of the loop, nothing can be emitted between.
            logged = _size_of(log) if since is not None and log is not None else 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store")]
                if await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers}) \
                        and await self._send(send, _chunk(b": nsinitd events\n\n")) \
                        and (not logged or await self._replay(send, cast(Path, log), logged, wanted)):
                    async for ev in channel:
                        last = ev.get("event") == "subscriber.dropped"
                        if (last or wanted(ev)) and not await self._send(send, _chunk(_sse(ev))):
                            break
                        if last:
                            break
                    else:
                        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()

    # -- /program/NAME/log/STREAM -----------------------------------------------------------------

    async def follow_log(self, name: str, stream: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Server-sent events of the lines a program writes from now on to its captured ``stream``
        (``stdout`` or ``stderr``), one ``data:`` line each (a line longer than LOG_TAIL_BYTES in
        pieces of that size), through rotation (the old file's last lines first). It reads the file
        when inotify on the log directory says it changed, never on a clock; nothing is buffered
        for the reader beyond one read of at most LOG_TAIL_BYTES, and a reader whose socket takes
        nothing for ``send_timeout`` is let go, like /events."""
        try:
            if stream not in ("stdout", "stderr"):
                raise ControlError("no_such_program", f"no such stream: {stream} (stdout or stderr)")
            path = self.api.log_path(name, stream)
        except ControlError as e:
            response = PlainTextResponse(f"{e.message}\n", status_code=HTTP_STATUS.get(e.code, 400))
            await response(scope, receive, send)
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to the Follower
            f.seek(0, os.SEEK_END)  # the page shows the tail; this is what comes after
        except FileNotFoundError:
            f = None
        follower = Follower(path, f)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store")]
                if await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers}) \
                        and await self._send(send, _chunk(b": nsinitd log\n\n")):
                    pending = b""
                    while True:
                        data = follower.read(LOG_TAIL_BYTES)
                        if not data:
                            await _wait_for_change(follower)
                            continue
                        *lines, pending = (pending + data).split(b"\n")
                        while len(pending) >= LOG_TAIL_BYTES:  # a line this long is sent in pieces
                            lines.append(pending[:LOG_TAIL_BYTES])
                            pending = pending[LOG_TAIL_BYTES:]
                        if lines and not await self._send(send, _chunk(b"".join(
                                b"data: " + line.replace(b"\r", b"") + b"\n\n" for line in lines))):
                            break
                nursery.cancel_scope.cancel()
        finally:
            follower.close()

    async def _replay(self, send: Send, log: Path, size: int, wanted: EventFilter) -> bool:
        """The events ``wanted`` among the first ``size`` bytes of the event log, read a piece
        at a time in a thread; False when the reader was let go."""
        pending = b""

        def next_piece(f: IO[bytes]) -> bytes | None:
            """The wanted events of the next piece, as server-sent events; None at the end."""
            nonlocal size, pending
            data = f.read(min(size, LOG_TAIL_BYTES)) if size > 0 else b""
            if not data:
                return None
            size -= len(data)
            *lines, pending = (pending + data).split(b"\n")
            return b"".join(_sse(ev) for ev in map(_event_of, lines) if ev is not None and wanted(ev))

        with open(log, "rb") as f:
            while (piece := await trio.to_thread.run_sync(next_piece, f)) is not None:
                if piece and not await self._send(send, _chunk(piece)):
                    return False
        return True

    async def _send(self, send: Send, message: Message) -> bool:
        """False when the reader's socket took nothing for send_timeout (it is then let go)."""
        with trio.move_on_after(self.limits.send_timeout):
            await send(message)
            return True
        return False


def _signal_field(request: Request, form: Mapping[str, str]) -> int:
    """The ``signal`` of a form, else of the query (``HUP``, ``SIGHUP``, ``1``); ConfigError naming it."""
    return parse_signal("signal", form.get("signal", request.query_params.get("signal", "")))


def _size_of(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _event_of(line: bytes) -> dict[str, Any] | None:
    """An event log line's object; None for what isn't one (a line cut short by a full disk)."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


def _chunk(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _sse(ev: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(ev, separators=(",", ":"), default=str).encode() + b"\n\n"


async def _wait_for_change(follower: Follower) -> None:
    """Until the followed file may have changed: inotify says so, or RECHECK passes (what inotify
    can't see, a network filesystem)."""
    fd = follower.inotify_fd
    if fd is None:
        await trio.sleep(Follower.POLL)
        return
    with trio.move_on_after(Follower.RECHECK):
        await trio.lowlevel.wait_readable(fd)
        follower.drain()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _body(request: Request) -> bytes:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            return b""  # not a form of ours: treated as empty, so it has no token either
    return data


def _answer(from_page: bool, status: int, code: str, message: str) -> Response:
    if from_page:
        text = html.escape(message)
        return HTMLResponse(f"{_HEAD}<title>nsinitd: {text}</title></head><body><p class=err>{text}</p>"
                            f'<p><a href="/">back</a></p></body></html>', status_code=status)
    return JSONResponse({"ok": False, "error": {"code": code, "message": message}}, status_code=status)


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope.get("headers", ()):
        if k == name:
            return str(v.decode("latin-1"))
    return ""


def _allowed_hosts(web: WebConfig) -> frozenset[str] | None:
    """The Host headers this server answers: its address as configured, and localhost on loopback.
    None on a unix socket: only local processes can reach it, whatever they call it."""
    if web.path is not None:
        return None
    assert web.host is not None
    host = f"[{web.host}]" if ":" in web.host else web.host
    hosts = {f"{host}:{web.port}"}
    if web.loopback:
        hosts.add(f"localhost:{web.port}")
    return frozenset(hosts)


def _tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except FileNotFoundError:
        return ""
    if len(data) == limit and b"\n" in data:
        data = data[data.index(b"\n") + 1 :]  # a partial first line says nothing
    return data.decode("utf-8", "replace")


# -- metrics ---------------------------------------------------------------------------------------


def exit_cause(ev: Mapping[str, Any]) -> str:
    """``oom``, ``signal``, ``expected`` (an exit code of exitcodes) or ``failure``."""
    if ev.get("oom_killed"):
        return "oom"
    if ev.get("signal"):
        return "signal"
    return "expected" if ev.get("expected") else "failure"


@dataclass(frozen=True)
class Row:
    status: ProgramStatus
    usage: Mapping[str, int]
    oom_killed: bool

    @property
    def cpu_seconds(self) -> float | None:
        return self.usage["cpu_usage_ns"] / 1e9 if "cpu_usage_ns" in self.usage else None

    @property
    def memory_bytes(self) -> int | None:
        return self.usage.get("memory_bytes")


def _usage(api: SupervisorAPI, name: str) -> Mapping[str, int]:
    try:
        return api.stats(name)
    except (NotImplementedError, ControlError):
        return {}


def _uptime(s: ProgramStatus, now: float) -> float:
    return max(0.0, now - s.since) if s.state == ProcessState.RUNNING.value else 0.0


class _Collector:
    """Read at each scrape: nothing is kept in prometheus_client's global registry."""

    def __init__(self, app: WebApp) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        api, now = self.app.api, time.time()
        statuses = api.status()
        state = GaugeMetricFamily("nsinit_program_state", "1 for the state the program is in, 0 for the others",
                                  labels=["program", "state"])
        restarts = CounterMetricFamily("nsinit_program_restarts", "Times the program was started again",
                                       labels=["program"])
        uptime = GaugeMetricFamily("nsinit_program_uptime_seconds", "Seconds since the program became RUNNING "
                                   "(0 when not running)", labels=["program"])
        cpu = CounterMetricFamily("nsinit_program_cpu_seconds", "CPU time used by the program's cgroup",
                                  labels=["program"])
        memory = GaugeMetricFamily("nsinit_program_memory_bytes", "Memory used by the program's cgroup",
                                   labels=["program"])
        for s in statuses:
            for st in ProcessState:
                state.add_metric([s.name, st.value], 1.0 if s.state == st.value else 0.0)
            restarts.add_metric([s.name], s.restarts)
            uptime.add_metric([s.name], _uptime(s, now))
            usage = _usage(api, s.name)
            if "cpu_usage_ns" in usage:
                cpu.add_metric([s.name], usage["cpu_usage_ns"] / 1e9)
            if "memory_bytes" in usage:
                memory.add_metric([s.name], usage["memory_bytes"])
        exits = CounterMetricFamily("nsinit_program_exits", "Exits seen since nsinitd started, by cause "
                                    "(expected, failure, signal, oom)", labels=["program", "cause"])
        for (program, cause), n in sorted(self.app.exits_total.items()):
            exits.add_metric([program, cause], n)
        events = CounterMetricFamily("nsinit_events", "Lifecycle events emitted, by event name", labels=["event"])
        for name, n in sorted(self.app.events_total.items()):
            events.add_metric([name], n)
        missed = CounterMetricFamily("nsinit_web_event_subscription_drops",
                                     "Times the metrics' event subscription fell behind (counts may miss events)")
        missed.add_metric([], self.app.events_missed)
        yield from (state, restarts, uptime, cpu, memory, exits, events, missed)


# -- pages -----------------------------------------------------------------------------------------

_HEAD = """<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #ddd;white-space:nowrap}
.wrap{overflow-x:auto}
tr.RUNNING td.state{color:#060;font-weight:bold}
td.num{text-align:right}
tr.FATAL,tr.BACKOFF,tr.EXITED{background:#fdd}
tr.FATAL td.state,tr.BACKOFF td.state,tr.EXITED td.state{color:#b00;font-weight:bold}
button{margin:.1em}
.err{color:#b00}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto;max-height:30em}
@media (max-width:600px){th.opt,td.opt{display:none}td.actions{white-space:normal}th,td{padding:.35em .3em}}
</style>
"""

_SCRIPT = """<script>
// Live rows: each lifecycle event refetches the table's data once (never more than one request in
// flight); without scripts the table is what the server rendered.
//
// Actions: the token is typed into the token field once and kept in this tab's sessionStorage
// (gone when the tab closes); a button then POSTs with "Authorization: Bearer" and the answer's
// message (a refusal, "not running") is shown above the table, without leaving the page.
(function () {
  var busy = false, again = false;
  var form = document.getElementById("programs"), msg = document.getElementById("msg");
  var field = form && form.querySelector("input[name=token]");
  var signal = form && form.querySelector("select[name=signal]");
  if (field) {
    field.value = sessionStorage.getItem("nsinit-token") || "";
    field.addEventListener("input", function () { sessionStorage.setItem("nsinit-token", field.value); });
  }
  if (form) form.addEventListener("submit", function (ev) {
    var button = ev.submitter;
    if (!button || !button.getAttribute("formaction")) return;
    ev.preventDefault();
    var headers = {"Accept": "application/json"}, url = button.getAttribute("formaction");
    if (field && field.value) headers["Authorization"] = "Bearer " + field.value;
    if (signal && url.slice(-7) === "/signal") url += "?signal=" + encodeURIComponent(signal.value);
    msg.textContent = "";
    fetch(url, {method: "POST", headers: headers, cache: "no-store"})
      .then(function (r) { return r.json(); })
      .then(function (answer) { if (!answer.ok) msg.textContent = answer.error.message; refresh(); })
      .catch(function (e) { msg.textContent = "request failed: " + e; });
  });
  function text(v) { return v === null || v === undefined ? "" : String(v); }
  function uptime(s) {
    s = Math.floor(s); var h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
    return h + ":" + (m < 10 ? "0" : "") + m + ":" + (r < 10 ? "0" : "") + r;
  }
  function lastExit(p) {
    var t = p.signal ? p.signal : text(p.exit_code);
    return p.oom_killed ? (t ? t + " (OOM)" : "OOM") : t;
  }
  function size(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch("/status.json", {cache: "no-store"}).then(function (r) { return r.json(); }).then(function (list) {
      list.forEach(function (p) {
        var row = document.getElementById("p-" + p.name);
        if (!row) return;
        row.className = p.state;
        row.querySelector(".state").textContent = p.state;
        row.querySelector(".pid").textContent = text(p.pid);
        row.querySelector(".uptime").textContent = p.state === "RUNNING" ? uptime(p.uptime) : "";
        row.querySelector(".restarts").textContent = text(p.restarts);
        row.querySelector(".exit").textContent = lastExit(p);
        row.querySelector(".cpu").textContent = p.cpu_seconds === null ? "" : p.cpu_seconds.toFixed(2) + " s";
        row.querySelector(".mem").textContent = p.memory_bytes === null ? "" : size(p.memory_bytes);
      });
    }).finally(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource("/events?event=program.*");
  source.onmessage = refresh;
  source.onopen = function () { if (form) form.setAttribute("data-live", "yes"); refresh(); };
})();
</script>"""


def _size(n: int) -> str:
    value, units = float(n), ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.1f} {units[i]}" if i else f"{n} B"


def last_exit(s: ProgramStatus, oom_killed: bool) -> str:
    """``3``, ``SIGKILL``, ``SIGKILL (OOM)``: the last exit's code or signal, and whether it was an OOM kill."""
    text = s.signal or ("" if s.exit_code is None else str(s.exit_code))
    return (f"{text} (OOM)" if text else "OOM") if oom_killed else text


def _row(r: Row, now: float, with_name_link: bool = True) -> str:
    e, s = html.escape, r.status
    name = f'<a href="/program/{e(s.name)}">{e(s.name)}</a>' if with_name_link else e(s.name)
    up = _uptime(s, now)
    uptime = f"{int(up) // 3600}:{int(up) % 3600 // 60:02d}:{int(up) % 60:02d}" if s.state == "RUNNING" else ""
    cpu = "" if r.cpu_seconds is None else f"{r.cpu_seconds:.2f} s"
    mem = "" if r.memory_bytes is None else _size(r.memory_bytes)
    buttons = "".join(f'<button formaction="/program/{e(s.name)}/{a}">{a}</button>' for a in ACTIONS)
    return (f'<tr id="p-{e(s.name)}" class="{e(s.state)}"><td>{name}</td><td class=state>{e(s.state)}</td>'
            f'<td class="pid opt">{s.pid or ""}</td><td class="uptime opt">{uptime}</td>'
            f'<td class="restarts opt">{s.restarts}</td><td class="exit opt">{e(last_exit(s, r.oom_killed))}</td>'
            f'<td class="cpu opt num">{cpu}</td><td class="mem opt num">{mem}</td>'
            f"<td class=actions>{buttons}</td></tr>")


def _table(rows: Iterable[Row], with_token: bool, now: float, back: str = "") -> str:
    token = ('<label>token <input type=password name=token autocomplete=current-password></label> '
             if with_token else "")
    # the signal a "signal" button sends (the form's field, with scripts on or off)
    signals = "".join(f"<option>{name}</option>" for name in PAGE_SIGNALS)
    fields = f"<p>{token}<label>signal <select name=signal>{signals}</select></label></p>"
    back_field = f'<input type=hidden name=back value="{back}">' if back else ""
    every = "" if back else ("<p>all programs: " + "".join(
        f'<button formaction="/all/{a}">{a} all</button>' for a in ALL_PICKS) + "</p>")
    body = "".join(_row(r, now, not back) for r in rows)
    return (f'<form id=programs method=post>{fields}{every}<p id=msg class=err role=alert></p>{back_field}'
            '<div class=wrap><table><thead><tr><th>program</th><th>state</th>'
            '<th class=opt>pid</th><th class=opt>uptime</th><th class=opt>restarts</th><th class=opt>last exit</th>'
            '<th class=opt>cpu</th><th class=opt>memory</th>'
            f"<th>actions</th></tr></thead><tbody>{body}</tbody></table></div></form>")


def render_page(rows: list[Row], with_token: bool, now: float) -> str:
    return (f"{_HEAD}<title>nsinitd</title></head><body><h1>nsinitd</h1>"
            f"{_table(rows, with_token, now)}"
            '<p><a href="/metrics">metrics</a> · <a href="/events">events</a></p>'
            f"{_SCRIPT}</body></html>")


def render_program(row: Row, logs: Mapping[str, str], with_token: bool, now: float) -> str:
    e = html.escape
    name = row.status.name
    sections = "".join(f'<h2>{stream}</h2><pre id=log-{stream} data-src="/program/{e(name)}/log/{stream}">'
                       f"{e(text) or '(empty)'}</pre>" for stream, text in logs.items())
    return (f"{_HEAD}<title>nsinitd: {e(name)}</title></head><body>"
            f'<p><a href="/">all programs</a></p><h1>{e(name)}</h1>'
            f"{_table([row], with_token, now, back='program')}{sections}{_SCRIPT}{_LOG_SCRIPT}</body></html>")


_LOG_SCRIPT = """<script>
// Each log section follows the program's output: its lines from /program/NAME/log/STREAM are
// appended as they are written (the page's last 64 KiB are kept). Without scripts it is the tail
// as rendered.
(function () {
  document.querySelectorAll("pre[data-src]").forEach(function (pre) {
    var empty = pre.textContent === "(empty)", source = new EventSource(pre.getAttribute("data-src"));
    source.onopen = function () { pre.setAttribute("data-following", "yes"); };
    source.onmessage = function (ev) {
      if (empty) { pre.textContent = ""; empty = false; }
      var text = pre.textContent + ev.data + "\\n";
      pre.textContent = text.length > 65536 ? text.slice(text.indexOf("\\n", text.length - 65536) + 1) : text;
      pre.scrollTop = pre.scrollHeight;
    };
  });
})();
</script>"""
