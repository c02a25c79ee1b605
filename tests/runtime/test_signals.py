"""nsruntime.signals: signal names both ways and exit statuses, read from _signal, as the signal
module (its enums) and the shell would say them."""

from __future__ import annotations

import os
import signal

import pytest

from nsruntime.signals import ExitStatus, signal_name, signal_number, status_to_code


@pytest.mark.parametrize("signum", [s.value for s in signal.Signals])
def test_signal_names_are_the_signal_modules(signum: int) -> None:
    assert signal_name(signum) == signal.Signals(signum).name


def test_signals_without_a_name_get_one_all_the_same() -> None:
    assert signal_name(signal.SIGRTMIN + 3) == "SIGRTMIN+3"
    assert signal_name(99) == "SIG99"


@pytest.mark.parametrize("text", ["TERM", "term", "SIGTERM", "sigterm", "15"])
def test_a_signal_is_named_with_or_without_sig_in_any_case_or_by_number(text: str) -> None:
    assert signal_number(text) == signal.SIGTERM


@pytest.mark.parametrize("text", ["", "SIG", "NOPE", "99", "0", "-9", "9x"])
def test_what_names_no_signal_gives_none(text: str) -> None:
    assert signal_number(text) is None


def test_every_signal_name_reads_back_as_its_number() -> None:
    for s in signal.Signals:
        assert signal_number(signal_name(s.value)) == s.value


def test_a_wait_status_becomes_the_shells_exit_code() -> None:
    assert status_to_code(3 << 8) == (3, None)
    assert status_to_code(signal.SIGKILL) == (137, signal.SIGKILL)
    assert ExitStatus.from_wait_status(signal.SIGTERM) == ExitStatus(143, signal.SIGTERM)
    assert ExitStatus.from_wait_status(signal.SIGTERM).signal_name == "SIGTERM"
    assert ExitStatus.from_wait_status(0).signal_name is None
    assert os.WIFEXITED(3 << 8)  # (the encoding assumed above)
