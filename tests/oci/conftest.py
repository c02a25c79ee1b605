"""The bundle every nsrun test drives, with the test as the child subreaper that reaps PID 1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nsruntime import libc
from tests.oci.test_nsrun import Bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Bundle]:
    libc.set_subreaper()  # as conmon and containerd's shim are (host_unchanged restores the flag)
    b = Bundle(tmp_path)
    yield b
    for cid in os.listdir(b.root) if b.root.exists() else []:
        b.nsrun("delete", "--force", cid)
    for pid in list(b.pids):
        b.reap(pid)
