"""The handshake between the creator, the setup child, PID 1 and the command's process.

Everything said over a container's control socket is here, as typed messages: one frozen record
per message, rendered and parsed in this one place, and a Reader that is fed bytes and yields
whole messages. Nothing here touches a socket but ``send``; the processes decide what to do.

On the wire a message is one line of ASCII (a word, then its numbers or text) and a newline.
Descriptors travel alongside a message (SCM_RIGHTS), never in it: the pty master goes with Ready.

Who says what, in order (creator = the host side, creator.py; see spawn.py for the other side)::

    setup child ─► Userns(pid)     its user namespace exists: write the id maps   (NEWUSER only)
    creator     ─► Mapped          the maps are written
    setup child ─► Pid(pid)        PID 1 exists (the zygote, or nobody when clone3 made it here)
    creator     ─► Go              the host side (network) is done with the namespaces
    command's   ─► Prestart        namespaces and mounts made, root not yet switched   (hooks only)
    creator     ─► Prestarted(s)   the runtime's hooks ran; s: the state for the container's own
    creator     ─► Start           exec the command (may come right after Go)
    command's   ─► Ready           the root is in place (+ the pty master with a terminal)
    PID 1       ─► Exited(c, s)    the command is gone: exit code c, killing signal s (0: none)
    anyone      ─► Error(text)     setup failed; text is one line naming what

A join helper says Pid(pid) of the command it forked (+ the pty master), or Error.
"""

from __future__ import annotations

from .errors import SetupError
from .lean import frozen, send_fds

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket


@frozen
class Go:
    """Creator to the command's process: the host side is done with the namespaces; set the root up."""


@frozen
class Start:
    """Creator to the command's process: exec the command."""


@frozen
class Mapped:
    """Creator to the setup child: the user namespace's id maps are written."""


@frozen
class Ready:
    """The command's process to the creator: the root is in place (the pty master travels alongside)."""


@frozen
class Prestart:
    """The command's process to the creator: the namespaces and mounts exist, the root is not yet
    switched; the runtime's hooks (OCI prestart, createRuntime) run now. Said only with hooks."""


@frozen
class Prestarted:
    """Creator to the command's process: the runtime's hooks ran; state is the container's state
    (one line of JSON) for the hooks the container runs itself."""

    state: str


@frozen
class Userns:
    """The setup child to the creator: its user namespace exists; pid is whose maps to write."""

    pid: int


@frozen
class Pid:
    """PID 1 exists with this host pid (from create's setup child or zygote); for join, the command's."""

    pid: int


@frozen
class Exited:
    """PID 1 to the creator, as it leaves: the command's exit code (128+N) and killing signal (0: none)."""

    code: int
    signal: int


@frozen
class Error:
    """Setup failed; text is one line naming the step, path or call."""

    text: str


Message = Go | Start | Mapped | Ready | Prestart | Prestarted | Userns | Pid | Exited | Error

_WORDS: dict[type[Message], str] = {Go: "go", Start: "start", Mapped: "mapped", Ready: "ready", Prestart: "prestart",
                                    Prestarted: "prestarted", Userns: "userns", Pid: "pid", Exited: "exited",
                                    Error: "error"}
_BARE: dict[str, Message] = {"go": Go(), "start": Start(), "mapped": Mapped(), "ready": Ready(),
                             "prestart": Prestart()}

#: A line longer than this is garbage, not a message (an error text is one line, well below it).
MAX_LINE = 64 * 1024


def render(*messages: Message) -> bytes:
    """The wire form of these messages, in order."""
    out = []
    for m in messages:
        if isinstance(m, Userns | Pid):
            line = f"{_WORDS[type(m)]} {m.pid}"
        elif isinstance(m, Exited):
            line = f"exited {m.code} {m.signal}"
        elif isinstance(m, Error):
            line = "error " + m.text.replace("\n", " ")
        elif isinstance(m, Prestarted):
            line = "prestarted " + m.state.replace("\n", " ")
        else:
            line = _WORDS[type(m)]
        out.append(line + "\n")
    return "".join(out).encode(errors="replace")


def parse(line: str) -> Message:
    """One message from its line (without the newline); ValueError names what the line holds."""
    word, _, rest = line.partition(" ")
    bare = _BARE.get(line)
    if bare is not None:
        return bare
    if word == "error" and rest:
        return Error(rest)
    if word == "prestarted" and rest:
        return Prestarted(rest)
    args = rest.split(" ")
    if word in ("pid", "userns") and len(args) == 1 and args[0].isdigit():
        return Pid(int(args[0])) if word == "pid" else Userns(int(args[0]))
    if word == "exited" and len(args) == 2 and all(a.isdigit() for a in args):
        return Exited(int(args[0]), int(args[1]))
    raise ValueError(f"not a message: {line!r}")


def describe(m: Message | None) -> str:
    """How an error message names m: its line as it came, or end of stream."""
    return "end of stream" if m is None else repr(render(m).decode().rstrip("\n"))


def expected(who: str, want: str, got: Message | None) -> SetupError:
    """The error for a message that is not the one the step waits for; an Error says its own text.

    ``container init: expected ready, got 'pid 12'``.
    """
    if isinstance(got, Error):
        return SetupError(who, got.text)
    return SetupError(who, f"expected {want}, got {describe(got)}")


class Reader:
    """Fed bytes as they come, hands out whole messages one at a time (next); a partial line waits
    for the bytes that end it, and what follows a message stays queued for whoever reads next."""

    def __init__(self, who: str) -> None:
        self.who = who  # names the peer in errors: "container init"
        self._buf = b""
        self._queue: list[Message] = []

    def feed(self, data: bytes) -> None:
        """Take data in. SetupError for a line that is not a message (what came before it is queued)."""
        self._buf += data
        while True:
            line, nl, rest = self._buf.partition(b"\n")
            if not nl:
                if len(self._buf) > MAX_LINE:
                    raise SetupError(self.who, f"a line of more than {MAX_LINE} bytes")
                return
            self._buf = rest
            text = line.decode(errors="replace")
            try:
                self._queue.append(parse(text))
            except ValueError:
                raise SetupError(self.who, f"unexpected message {text!r}") from None

    def next(self) -> Message | None:
        """The oldest whole message not yet taken, or None."""
        return self._queue.pop(0) if self._queue else None


def receive(sock: socket.socket, reader: Reader) -> Message | None:
    """The next message from sock, blocking until it is whole; None at end of stream."""
    while (m := reader.next()) is None:
        chunk = sock.recv(256)
        if not chunk:
            return None
        reader.feed(chunk)
    return m


def send(sock: socket.socket, *messages: Message, fds: list[int] | None = None) -> None:
    """Say these messages over sock, fds alongside the first byte."""
    data = render(*messages)
    if fds:
        send_fds(sock, data, fds)
    else:
        sock.sendall(data)
