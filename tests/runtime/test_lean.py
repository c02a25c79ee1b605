"""nsruntime.lean stands in for json, dataclasses, contextlib.suppress and socket's fd passing on the
`nsinit exec` start path: each stand-in must answer as the real one does, for any input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsruntime import lean

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(_json_values)
def test_dumps_writes_what_json_dumps_writes(value: object) -> None:
    assert lean.dumps(value) == json.dumps(value)


@given(_json_values)
def test_loads_skips_a_utf8_byte_order_mark_as_json_does(value: object) -> None:
    data = b"\xef\xbb\xbf" + json.dumps(value, ensure_ascii=False).encode()
    assert lean.loads(data) == json.loads(data)


def test_read_file_reads_what_open_reads(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 1000)  # past one 64 KiB read
    assert lean.read_file(str(big)) == big.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert lean.read_file(str(tmp_path / "empty")) == b""
    with pytest.raises(FileNotFoundError):
        lean.read_file(str(tmp_path / "none"))


@given(_json_values, st.sampled_from(["", " ", "\n", "\t \r\n"]))
def test_loads_reads_back_what_json_wrote(value: object, pad: str) -> None:
    text = pad + json.dumps(value, indent=1) + pad
    assert lean.loads(text) == json.loads(text)
    assert lean.loads(text.encode()) == json.loads(text.encode())


@given(st.text(max_size=30))
def test_loads_accepts_and_refuses_what_json_does(text: str) -> None:
    try:
        want: object = json.loads(text)
    except json.JSONDecodeError as e:
        with pytest.raises(lean.JSONError) as got:
            lean.loads(text)
        assert (got.value.msg, got.value.lineno, got.value.colno) == (e.msg, e.lineno, e.colno)
        return
    have = lean.loads(text)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(have, float) and math.isnan(have)
    else:
        assert have == want


@dataclasses.dataclass(frozen=True)
class _Real:
    name: str
    size: int = 0
    tags: tuple[str, ...] = ()


@lean.frozen
class _Lean:
    name: str
    size: int = 0
    tags: tuple[str, ...] = ()


_fields = st.tuples(st.text(max_size=5), st.integers(), st.tuples(st.text(max_size=3)))


@given(_fields, _fields)
def test_frozen_records_compare_hash_and_print_as_frozen_dataclasses_do(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    ra, rb, la, lb = _Real(*a), _Real(*b), _Lean(*a), _Lean(*b)
    assert (la == lb) == (ra == rb)
    assert (hash(la) == hash(lb)) or ra != rb
    assert repr(la).replace("_Lean", "_Real") == repr(ra)
    assert lean.replace(la, size=a[1] + 1) == _Lean(a[0], a[1] + 1, a[2])
    assert dataclasses.replace(ra, size=a[1] + 1) == _Real(a[0], a[1] + 1, a[2])


def test_frozen_records_refuse_what_frozen_dataclasses_refuse() -> None:
    rec = _Lean("a", 1)
    assert rec == _Lean(name="a", size=1, tags=())
    with pytest.raises(AttributeError, match="frozen"):
        rec.size = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="missing argument 'name'"):
        _Lean()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected argument"):
        _Lean("a", colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="has no field 'colour'"):
        lean.replace(rec, colour="red")


def test_suppress_swallows_only_what_it_names() -> None:
    with lean.suppress(KeyError):
        raise KeyError("gone")
    with pytest.raises(ValueError), lean.suppress(KeyError):
        raise ValueError("kept")
