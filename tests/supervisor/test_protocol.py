"""The control protocol on plain bytes: framing, limits, parsing errors. No sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import protocol as proto


def server() -> proto.Connection:
    return proto.Connection(proto.Role.SERVER)


def client() -> proto.Connection:
    return proto.Connection(proto.Role.CLIENT)


def drain(conn: proto.Connection) -> list[object]:
    out: list[object] = []
    while True:
        event = conn.next_event()
        if event is proto.NEED_DATA or event is proto.CLOSED:
            out.append(event)
            return out
        out.append(event)


def test_request_roundtrip() -> None:
    c, s = client(), server()
    request_id, data = c.request("status", names=["web", "db"])
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    s.receive_data(data)
    assert s.next_event() == proto.Request(request_id, "status", {"names": ["web", "db"]})
    assert s.next_event() is proto.NEED_DATA


def test_request_ids_increase() -> None:
    c = client()
    assert [c.request("version")[0] for _ in range(3)] == [1, 2, 3]


def test_reply_error_and_stream_roundtrip() -> None:
    s, c = server(), client()
    messages: list[proto.Message] = [
        proto.Reply(1, [{"name": "web", "state": "RUNNING"}]),
        proto.Error(2, "no_such_program", "no such program: x"),
        proto.Error(None, proto.REFUSED, "permission denied"),
        proto.StreamItem(3, {"event": "program.running", "pid": 4, "text": "a\nb"}),
        proto.StreamEnd(3, "dropped", "too slow"),
    ]
    c.receive_data(b"".join(s.send(m) for m in messages))
    assert drain(c) == [*messages, proto.NEED_DATA]


def test_byte_at_a_time() -> None:
    c, s = client(), server()
    _, data = c.request("signal", name="web", signum=1)
    for i, byte in enumerate(data):
        assert s.next_event() is proto.NEED_DATA
        s.receive_data(bytes([byte]))
        assert s.pending == i + 1
    assert s.next_event() == proto.Request(1, "signal", {"name": "web", "signum": 1})


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_any_split_gives_the_same_messages(cuts: list[int]) -> None:
    c = client()
    stream = b"".join(c.request("status")[1] for _ in range(5)) + c.request("stop", name="ü-web")[1]
    s = server()
    got: list[object] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        s.receive_data(stream[pos : pos + cut])
        pos += cut
        got.extend(e for e in drain(s) if e is not proto.NEED_DATA)
        if pos >= len(stream):
            break
    assert [getattr(e, "command", None) for e in got] == ["status"] * 5 + ["stop"]


def test_clean_eof_is_closed() -> None:
    s = server()
    s.receive_data(b'{"id":1,"cmd":"version"}\n')
    s.receive_data(b"")
    assert isinstance(s.next_event(), proto.Request)
    assert s.next_event() is proto.CLOSED


def test_eof_mid_line_is_fatal() -> None:
    s = server()
    s.receive_data(b'{"id":1,"cmd":"ver')
    s.receive_data(b"")
    with pytest.raises(proto.ProtocolError) as e:
        s.next_event()
    assert e.value.fatal and e.value.code == proto.MALFORMED
    with pytest.raises(proto.ProtocolError):
        s.next_event()


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "expected a JSON object, got an array"),
        (b'"x"', "got a string"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"cmd":"status"}', "id"),
        (b'{"id":-1,"cmd":"status"}', "id"),
        (b'{"id":true,"cmd":"status"}', "id"),
        (b'{"id":1,"cmd":"status","extra":1}', "unknown field"),
        (b'{"id":1,"cmd":"status","args":[]}', "args"),
        (b"[" * 100000 + b"]" * 100000, "not JSON"),
    ],
)
def test_malformed_line_is_not_fatal(line: bytes, fragment: str) -> None:
    s = proto.Connection(proto.Role.SERVER, max_line=1_000_000)
    s.receive_data(line + b"\n" + b'{"id":9,"cmd":"version"}\n')
    with pytest.raises(proto.ProtocolError) as e:
        s.next_event()
    assert not e.value.fatal
    assert fragment in e.value.message
    assert s.next_event() == proto.Request(9, "version", {})


@pytest.mark.parametrize(
    ("request_obj", "fragment"),
    [
        ({"id": 4, "cmd": "frobnicate"}, "unknown command 'frobnicate'"),
        ({"id": 4, "cmd": 7}, "cmd: expected a string"),
        ({"id": 4, "cmd": "start"}, "missing argument 'name'"),
        ({"id": 4, "cmd": "start", "args": {"name": 3}}, "name: expected a string"),
        ({"id": 4, "cmd": "start", "args": {"name": ""}}, "name: expected a string"),
        ({"id": 4, "cmd": "start", "args": {"name": "a\u0000b"}}, "name: expected a string"),
        ({"id": 4, "cmd": "start", "args": {"name": "x" * 300}}, "name: expected a string"),
        ({"id": 4, "cmd": "start", "args": {"name": "a", "force": True}}, "unknown argument 'force'"),
        ({"id": 4, "cmd": "signal", "args": {"name": "a", "signum": "HUP"}}, "signum: expected an integer"),
        ({"id": 4, "cmd": "signal", "args": {"name": "a", "signum": True}}, "signum: expected an integer"),
        ({"id": 4, "cmd": "log_path", "args": {"name": "a", "stream": "stdin"}}, "stream: expected one of"),
        ({"id": 4, "cmd": "status", "args": {"names": "web"}}, "names: expected a list"),
        ({"id": 4, "cmd": "status", "args": {"names": ["ok", 1]}}, "names: expected a list"),
    ],
)
def test_bad_request_carries_its_id(request_obj: dict[str, object], fragment: str) -> None:
    s = server()
    s.receive_data(json.dumps(request_obj).encode() + b"\n")
    with pytest.raises(proto.ProtocolError) as e:
        s.next_event()
    assert e.value.code == "bad_request"
    assert e.value.request_id == 4
    assert fragment in e.value.message
    assert not e.value.fatal


def test_oversized_line_is_fatal_before_its_newline() -> None:
    s = proto.Connection(proto.Role.SERVER, max_line=1000)
    s.receive_data(b'{"id":1,"cmd":"status","args":{"names":["' + b"a" * 2000)
    with pytest.raises(proto.ProtocolError) as e:
        s.next_event()
    assert e.value.fatal and e.value.code == proto.TOO_LARGE


def test_oversized_complete_line_is_fatal() -> None:
    s = proto.Connection(proto.Role.SERVER, max_line=100)
    s.receive_data(b" " * 200 + b'{"id":1,"cmd":"version"}\n')
    with pytest.raises(proto.ProtocolError) as e:
        s.next_event()
    assert e.value.code == proto.TOO_LARGE


def test_default_limits_by_role() -> None:
    assert server().max_line == proto.MAX_REQUEST_BYTES
    assert client().max_line == proto.MAX_RESPONSE_BYTES


def test_line_exactly_at_the_limit_is_accepted() -> None:
    line = b'{"id":1,"cmd":"version"}'
    s = proto.Connection(proto.Role.SERVER, max_line=len(line))
    s.receive_data(line + b"\n")
    assert s.next_event() == proto.Request(1, "version", {})


def test_crlf_tolerated() -> None:
    s = server()
    s.receive_data(b'{"id":1,"cmd":"version"}\r\n')
    assert s.next_event() == proto.Request(1, "version", {})


def test_client_refuses_to_send_bad_requests() -> None:
    c = client()
    with pytest.raises(proto.ProtocolError):
        c.request("nope")
    with pytest.raises(TypeError):
        c.send(proto.Reply(1, None))
    with pytest.raises(TypeError):
        server().send(proto.Request(1, "version"))


def test_client_parses_malformed_responses() -> None:
    c = client()
    c.receive_data(b'{"id":1}\n{"id":"x","ok":true}\n{"id":1,"ok":false,"error":3}\n{"item":{}}\n')
    for _ in range(4):
        with pytest.raises(proto.ProtocolError):
            c.next_event()
    assert c.next_event() is proto.NEED_DATA


def test_unencodable_result_raises_value_error() -> None:
    with pytest.raises(ValueError):
        server().send(proto.Reply(1, float("nan")))


def test_every_command_has_a_spec() -> None:
    assert set(proto.COMMANDS) >= proto.STREAMING_COMMANDS
    c = client()
    for command, spec in proto.COMMANDS.items():
        args = {
            k: {"name": "web", "signum": 15, "stream": "stdout", "names": ["web"]}[k]
            for k, (_kind, required) in spec.items()
            if required
        }
        c.request(command, **args)


@given(st.binary(max_size=2000), st.sampled_from([proto.Role.SERVER, proto.Role.CLIENT]))
def test_arbitrary_bytes_only_ever_raise_protocol_errors(data: bytes, role: proto.Role) -> None:
    conn = proto.Connection(role, max_line=512)
    conn.receive_data(data)
    conn.receive_data(b"")
    for _ in range(len(data) + 2):
        try:
            event = conn.next_event()
        except proto.ProtocolError as e:
            if e.fatal:
                return
            continue
        if event is proto.CLOSED:
            return
        assert event is not proto.NEED_DATA  # after EOF there is nothing more to wait for
        assert isinstance(event, proto.Request | proto.Reply | proto.Error | proto.StreamItem | proto.StreamEnd)
    raise AssertionError("next_event never reached the end")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_any_json_line_is_parsed_or_refused(value: object) -> None:
    s = server()
    s.receive_data(json.dumps({"id": 1, "cmd": "status", "args": value}).encode() + b"\n")
    try:
        event = s.next_event()
    except proto.ProtocolError as e:
        assert not e.fatal
    else:
        assert isinstance(event, proto.Request) and set(event.args) <= {"names"}
