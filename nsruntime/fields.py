"""Readers of decoded JSON fields: each checks one value's type (and range) and raises
ConfigError naming its field path (``cgroups.memory``, ``linux.seccomp.syscalls[3].action``),
echoing at most 40 characters of a bad value, on one line.

Shared by config.py (container.json) and seccomp.py (OCI profiles), so that both documents
refuse a wrong value in the same words.
"""

from __future__ import annotations

from .errors import ConfigError
from .lean import JSONError, dumps, loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")


_SHOWN = 40  # characters of a value echoed in an error: a 100,000-character hostname is not repeated whole


def _cap(s: str, *, quote: bool = False) -> str:
    """s as an error shows it: on one line (JSON escapes for what is not printable), its first
    40 characters, then how long it really was."""
    if not s.isprintable():
        s = dumps(s)[1:-1]
    head = f'"{s[:_SHOWN]}"' if quote else s[:_SHOWN]
    return f"{head}... ({len(s)} characters)" if len(s) > _SHOWN else head


def _q(s: str) -> str:
    """s quoted for an error message (see _cap)."""
    return _cap(s, quote=True)


def _type_name(v: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(v), type(v).__name__
    )


def _expect(path: str, value: object, kind: type[T], what: str) -> T:
    # bool is an int in Python; JSON true is never a number here
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(path, f"expected {what}, got {_type_name(value)}")
    return value


def _obj(path: str, value: object, known: set[str]) -> dict[str, Any]:
    d = _expect(path, value, dict, "an object")
    for key in d:
        if key not in known:
            shown = _cap(key) if key.isprintable() and key.strip() == key and key else _cap(dumps(key))  # one line
            raise ConfigError(f"{path}.{shown}" if path else shown, "unknown field")
    return d


def _str(path: str, value: object, *, empty: bool = False) -> str:
    s = _expect(path, value, str, "a string")
    if not empty and not s:
        raise ConfigError(path, "must not be empty")
    if "\x00" in s:
        raise ConfigError(path, "must not contain a NUL byte")
    return s


def _bool(path: str, value: object) -> bool:
    return _expect(path, value, bool, "a boolean")


def _int(path: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    n = _expect(path, value, int, "an integer")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(path, f"{_cap(str(n))} out of range ({rng})")
    return n


def _list(path: str, value: object) -> list[Any]:
    return _expect(path, value, list, "a list")


def decode_json(path: str, raw: bytes, max_bytes: int) -> object:
    """The JSON document read from path (at most max_bytes, raw holding up to one byte more);
    ConfigError naming path for a file too large, not UTF-8 or malformed."""
    if len(raw) > max_bytes:
        raise ConfigError(path, f"larger than {max_bytes} bytes")
    try:
        return loads(raw)
    except UnicodeDecodeError:
        raise ConfigError(path, "not UTF-8") from None
    except JSONError as e:
        raise ConfigError(path, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ConfigError(path, "malformed JSON: nested too deeply") from None
