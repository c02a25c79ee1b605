"""The transition table on its own: no clock, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import machine as m
from supervisor.states import ProcessState as S
from supervisor.states import Wanted

P = m.Policy(autorestart="on-failure", startretries=2, backoff_initial=1.0, backoff_factor=2.0,
             backoff_max=3.0)


def names(actions: list[m.Action]) -> list[str]:
    return [a.event if isinstance(a, m.Emit) else type(a).__name__ for a in actions]


@pytest.mark.parametrize("state", [S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF])
def test_start_spawns_and_resets_attempts(state: S) -> None:
    new, actions = m.step(m.Status(state, Wanted.DOWN, 2), m.Start(), P)
    assert new == m.Status(S.STARTING, Wanted.UP, 0)
    assert names(actions) == ["program.starting", "Spawn"]


def test_started_makes_running_and_resets_the_count() -> None:
    new, actions = m.step(m.Status(S.STARTING, Wanted.UP, 2), m.Started(), P)
    assert new == m.Status(S.RUNNING, Wanted.UP, 0)
    assert names(actions) == ["program.running"]


@pytest.mark.parametrize("event", [m.Exited(expected=True), m.Exited(expected=False), m.SpawnFailed("x")])
def test_any_exit_while_starting_is_a_failed_start(event: m.Event) -> None:
    new, actions = m.step(m.Status(S.STARTING, Wanted.UP, 0), event, P)
    assert new == m.Status(S.BACKOFF, Wanted.UP, 1)
    assert names(actions) == ["program.backoff", "ScheduleRetry"]
    assert actions[1] == m.ScheduleRetry(1.0)
    assert isinstance(actions[0], m.Emit) and actions[0].fields["attempt"] == 1


def test_backoff_elapsed_retries() -> None:
    new, actions = m.step(m.Status(S.BACKOFF, Wanted.UP, 1), m.BackoffElapsed(), P)
    assert new == m.Status(S.STARTING, Wanted.UP, 1)
    assert names(actions) == ["program.starting", "Spawn"]
    assert isinstance(actions[0], m.Emit) and actions[0].fields == {"attempt": 2}


def test_fatal_after_startretries() -> None:
    st = m.Status(S.STARTING, Wanted.UP, 0)
    delays = []
    for _ in range(P.startretries):
        st, actions = m.step(st, m.Exited(), P)
        assert st.state is S.BACKOFF
        delays.append(next(a.delay for a in actions if isinstance(a, m.ScheduleRetry)))
        st, _ = m.step(st, m.BackoffElapsed(), P)
        assert st.state is S.STARTING
    st, actions = m.step(st, m.Exited(), P)
    assert st == m.Status(S.FATAL, Wanted.DOWN, 3)
    assert names(actions) == ["program.fatal"]
    assert delays == [1.0, 2.0]


def test_spawn_failure_reason_reaches_fatal() -> None:
    p = m.Policy(startretries=0)
    st, actions = m.step(m.Status(S.STARTING, Wanted.UP, 0), m.SpawnFailed("exec /x: ENOENT"), p)
    assert st.state is S.FATAL
    assert isinstance(actions[0], m.Emit) and "exec /x: ENOENT" in actions[0].fields["reason"]


@pytest.mark.parametrize(
    ("policy", "expected", "restart"),
    [
        ("always", True, True), ("always", False, True),
        ("on-failure", True, False), ("on-failure", False, True),
        ("never", True, False), ("never", False, False),
    ],
)
def test_exit_from_running_follows_the_policy(policy: m.AutoRestart, expected: bool, restart: bool) -> None:
    p = m.Policy(autorestart=policy)
    st, actions = m.step(m.Status(S.RUNNING, Wanted.UP, 0), m.Exited(expected=expected), p)
    if restart:
        assert st == m.Status(S.STARTING, Wanted.UP, 0)
        assert names(actions) == ["program.starting", "Spawn"]
    else:
        assert st == m.Status(S.EXITED, Wanted.DOWN, 0)
        assert actions == []


@pytest.mark.parametrize("state", [S.STARTING, S.RUNNING])
def test_stop_a_live_program(state: S) -> None:
    st, actions = m.step(m.Status(state, Wanted.UP, 0), m.Stop(), P)
    assert st == m.Status(S.STOPPING, Wanted.DOWN, 0)
    assert names(actions) == ["program.stopping", "SignalStop"]


def test_stop_timeout_kills_and_exit_stops() -> None:
    st = m.Status(S.STOPPING, Wanted.DOWN, 0)
    st2, actions = m.step(st, m.StopTimeout(), P)
    assert st2 == st and names(actions) == ["Kill"]
    st3, actions = m.step(st, m.Exited(expected=False), P)
    assert st3 == m.Status(S.STOPPED, Wanted.DOWN, 0)
    assert names(actions) == ["program.stopped"]


def test_stop_in_backoff_cancels_the_retry() -> None:
    st, actions = m.step(m.Status(S.BACKOFF, Wanted.UP, 2), m.Stop(), P)
    assert st.state is S.STOPPED and st.wanted is Wanted.DOWN
    assert names(actions) == ["program.stopped"]


def test_stop_while_stopping_changes_nothing_but_wanted() -> None:
    st, actions = m.step(m.Status(S.STOPPING, Wanted.DOWN, 0), m.Stop(), P)
    assert st.state is S.STOPPING and actions == []


def test_an_adopted_process_is_running_and_wanted_up_at_once() -> None:
    st, actions = m.step(m.Status(), m.Adopted(), P)
    assert st == m.Status(S.RUNNING, Wanted.UP, 0)
    assert names(actions) == ["program.adopted"]  # no Spawn: the process runs already
    for state in S:  # only a program nothing has happened to yet adopts
        assert m.allowed(state, m.Adopted) is (state is S.STOPPED)


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.STOPPED, m.Stop()), (S.RUNNING, m.Start()), (S.STOPPED, m.Exited()), (S.RUNNING, m.BackoffElapsed()),
     (S.EXITED, m.Started()), (S.FATAL, m.StopTimeout()), (S.STOPPING, m.Start())],
)
def test_unknown_transition_raises_and_changes_nothing(state: S, event: m.Event) -> None:
    status = m.Status(state, Wanted.UP, 1)
    with pytest.raises(m.InvalidTransition, match=state.value):
        m.step(status, event, P)
    assert status == m.Status(state, Wanted.UP, 1)
    assert not m.allowed(state, type(event))


def test_backoff_delay_is_exponential_and_capped() -> None:
    p = m.Policy(backoff_initial=0.5, backoff_factor=3.0, backoff_max=10.0)
    assert [m.backoff_delay(n, p) for n in range(0, 6)] == [0.0, 0.5, 1.5, 4.5, 10.0, 10.0]


def test_every_state_has_a_way_out() -> None:
    for state in S:
        assert any(s is state for s, _ in m.TRANSITIONS), state


EVENTS = st.sampled_from([m.Start(), m.Stop(), m.Started(), m.SpawnFailed("x"), m.Exited(True),
                          m.Exited(False), m.BackoffElapsed(), m.StopTimeout()])


@given(st.lists(EVENTS, max_size=60), st.sampled_from(["always", "on-failure", "never"]),
       st.integers(0, 4))
def test_random_event_sequences_stay_in_the_table(events: list[m.Event], policy: m.AutoRestart,
                                                  retries: int) -> None:
    p = m.Policy(autorestart=policy, startretries=retries)
    status = m.Status()
    for ev in events:
        if not m.allowed(status.state, type(ev)):
            with pytest.raises(m.InvalidTransition):
                m.step(status, ev, p)
            continue
        new, actions = m.step(status, ev, p)
        assert new.attempt <= retries + 1
        if new.state is S.FATAL:
            assert new.wanted is Wanted.DOWN
        if any(isinstance(a, m.Spawn) for a in actions):
            assert new.state is S.STARTING
        status = new
