"""Output capture and size rotation by renaming (never seeking a pipe)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from supervisor.logs import ProgramLogs, RotatingFile, pump


def test_rotation_keeps_backups_and_order(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "p.out", maxbytes=100, backups=2)
    lines = [f"line {i:03d}\n".encode() for i in range(40)]  # 9 bytes each, 360 total
    for line in lines:
        f.write(line)
    f.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["p.out", "p.out.1", "p.out.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 100
        assert p.read_bytes().endswith(b"\n")  # cut at line ends when possible
    tail = b"".join((tmp_path / n).read_bytes() for n in ["p.out.2", "p.out.1", "p.out"])
    assert b"".join(lines).endswith(tail)


def test_no_backups_discards_and_zero_maxbytes_never_rotates(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "a.out", maxbytes=10, backups=0)
    f.write(b"0123456789")
    f.write(b"abc")
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.out"]
    assert (tmp_path / "a.out").read_bytes() == b"abc"
    g = RotatingFile(tmp_path / "b.out", maxbytes=0, backups=3)
    g.write(b"x" * 10_000)
    g.close()
    assert (tmp_path / "b.out").stat().st_size == 10_000


def test_a_huge_write_is_split_across_files(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "a.out", maxbytes=10, backups=5)
    f.write(b"y" * 35)
    f.close()
    sizes = sorted((p.name, p.stat().st_size) for p in tmp_path.iterdir())
    assert sizes == [("a.out", 5), ("a.out.1", 10), ("a.out.2", 10), ("a.out.3", 10)]


def test_reopen_after_logrotate(tmp_path: Path) -> None:
    logs = ProgramLogs(tmp_path, "p", 0, 0, redirect_stderr=True)
    assert logs.stdout is logs.stderr and logs.path("stderr") == tmp_path / "p.out"
    logs.stdout.write(b"old\n")
    (tmp_path / "p.out").rename(tmp_path / "p.out.old")
    logs.reopen()
    logs.stdout.write(b"new\n")
    logs.close()
    assert (tmp_path / "p.out").read_bytes() == b"new\n"
    assert (tmp_path / "p.out.old").read_bytes() == b"old\n"


async def test_pump_copies_a_pipe_until_eof(tmp_path: Path) -> None:
    r, w = os.pipe()
    sink = RotatingFile(tmp_path / "x.out", maxbytes=1000, backups=1)
    async with trio.open_nursery() as n:
        n.start_soon(pump, r, sink)
        for i in range(300):
            os.write(w, f"{i}\n".encode())
        os.close(w)
    sink.close()
    data = (tmp_path / "x.out.1").read_bytes() + (tmp_path / "x.out").read_bytes()
    assert data == b"".join(f"{i}\n".encode() for i in range(300))
