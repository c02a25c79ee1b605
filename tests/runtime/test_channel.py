"""nsruntime.channel on plain bytes: every message round-trips, a stream cut anywhere reads the
same, and a message out of turn or out of the protocol is an error naming what came."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsruntime import channel
from nsruntime.errors import SetupError

_texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), min_size=1, max_size=40)
_messages = st.one_of(
    st.just(channel.Go()), st.just(channel.Start()), st.just(channel.Mapped()), st.just(channel.Ready()),
    st.builds(channel.Userns, st.integers(0, 2**22)), st.builds(channel.Pid, st.integers(0, 2**22)),
    st.builds(channel.Exited, st.integers(0, 255), st.integers(0, 64)),
    st.builds(channel.Error, _texts.filter(lambda t: t.strip() == t and t.isprintable())),
    st.just(channel.Prestart()),
    st.builds(channel.Prestarted, _texts.filter(lambda t: t.strip() == t and t.isprintable())),
)


def _read(*chunks: bytes) -> list[channel.Message]:
    reader = channel.Reader("container init")
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        while (m := reader.next()) is not None:
            out.append(m)
    return out


@pytest.mark.parametrize(("message", "wire"), [
    (channel.Go(), b"go\n"), (channel.Start(), b"start\n"), (channel.Mapped(), b"mapped\n"),
    (channel.Ready(), b"ready\n"), (channel.Userns(41), b"userns 41\n"), (channel.Pid(12), b"pid 12\n"),
    (channel.Exited(137, 9), b"exited 137 9\n"), (channel.Error("mount /proc: EPERM"), b"error mount /proc: EPERM\n"),
    (channel.Prestart(), b"prestart\n"),
    (channel.Prestarted('{"pid": 12, "status": "creating"}'), b'prestarted {"pid": 12, "status": "creating"}\n'),
])  # fmt: skip
def test_each_message_has_one_line_on_the_wire(message: channel.Message, wire: bytes) -> None:
    assert channel.render(message) == wire
    assert _read(wire) == [message]


@given(st.lists(_messages, max_size=8))
def test_every_message_round_trips(messages: list[channel.Message]) -> None:
    assert _read(channel.render(*messages)) == messages


@given(st.lists(_messages, min_size=1, max_size=6), st.data())
def test_a_stream_split_at_any_byte_reads_the_same(messages: list[channel.Message], data: st.DataObject) -> None:
    wire = channel.render(*messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert _read(*chunks) == messages


def test_an_error_text_stays_on_one_line() -> None:
    assert channel.render(channel.Error("two\nlines")) == b"error two lines\n"


def test_a_message_out_of_turn_names_what_was_expected_and_what_came() -> None:
    with pytest.raises(SetupError) as e:
        raise channel.expected("container init", "ready", channel.Pid(12))
    assert str(e.value) == "container init: expected ready, got 'pid 12'"


def test_the_end_of_the_stream_out_of_turn_says_so() -> None:
    assert str(channel.expected("join", "pid", None)) == "join: expected pid, got end of stream"


def test_an_error_in_place_of_the_expected_message_says_its_own_text() -> None:
    assert str(channel.expected("container setup", "pid", channel.Error("unshare: EPERM"))) == \
        "container setup: unshare: EPERM"


@pytest.mark.parametrize("line", [b"hello", b"pid", b"pid x", b"pid -1", b"exited 1", b"error", b"go now", b"GO"])
def test_a_line_that_is_no_message_is_an_error_naming_it(line: bytes) -> None:
    reader = channel.Reader("container init")
    with pytest.raises(SetupError) as e:
        reader.feed(b"go\n" + line + b"\n")
    assert str(e.value) == f"container init: unexpected message {line.decode()!r}"
    assert reader.next() == channel.Go()  # what came before it is kept


def test_a_partial_line_waits_for_the_rest() -> None:
    reader = channel.Reader("creator")
    reader.feed(b"sta")
    assert reader.next() is None
    reader.feed(b"rt\nexi")
    assert reader.next() == channel.Start()
    assert reader.next() is None


def test_a_line_without_end_is_refused_past_the_limit() -> None:
    reader = channel.Reader("container init")
    with pytest.raises(SetupError) as e:
        reader.feed(b"x" * (channel.MAX_LINE + 1))
    assert str(e.value) == f"container init: a line of more than {channel.MAX_LINE} bytes"
