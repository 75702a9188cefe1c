"""``ExitReason``, ``ExitStatus`` (``is_graceful``/``exit_code``) and ``ServiceConfig``.

Issue 3, bullet 3 (``ServiceConfig``, ``ExitStatus.exit_code``).
"""

from __future__ import annotations

import json
import math
import pickle
from datetime import timedelta

import pytest

from dig_service import (
    ExitReason,
    ExitStatus,
    PhaseReport,
    ServiceConfig,
    ShutdownReason,
    ShutdownReport,
    StragglerReport,
    TaskKind,
)

GRACEFUL_REASONS = [
    ShutdownReason.UserRequested(),
    ShutdownReason.RpcRequested(),
    ShutdownReason.ReloadRequested(),
    ShutdownReason.RequestedByRun(),
]


@pytest.mark.parametrize("reason", GRACEFUL_REASONS, ids=repr)
def test_requested_shutdown_is_graceful_unless_fatal(reason: ShutdownReason) -> None:
    """Proves: ``RequestedShutdown`` with any non-Fatal reason is graceful, exit code 0.

    Catches: a clean SIGTERM reported as a failure (restart loops under systemd/k8s).
    """
    status = ExitStatus(ExitReason.RequestedShutdown(reason))
    assert status.is_graceful() and status.exit_code == 0


def test_fatal_and_run_error_are_not_graceful_run_completed_is() -> None:
    """Proves: the one classification: ``False`` exactly for ``RunError`` and
    ``RequestedShutdown(Fatal)``; ``exit_code`` is 1 for those, 0 for ``RunCompleted``.

    Catches: a crash reported as exit code 0 (the orchestrator never restarts it).
    """
    fatal = ExitStatus(ExitReason.RequestedShutdown(ShutdownReason.Fatal("disk gone")))
    assert not fatal.is_graceful() and fatal.exit_code == 1
    boom = RuntimeError("boom")
    error = ExitStatus(ExitReason.RunError(boom))
    assert not error.is_graceful() and error.exit_code == 1
    assert error.reason == ExitReason.RunError(boom)
    done = ExitStatus(ExitReason.RunCompleted())
    assert done.is_graceful() and done.exit_code == 0
    assert str(error) == "run failed: RuntimeError: boom (exit code 1)"
    assert str(fatal) == "shutdown requested (fatal: disk gone) (exit code 1)"


def test_exit_reason_variants_match_compare_and_pickle() -> None:
    """Proves: ``ExitReason`` variants work with ``match``, compare by value, pickle,
    reject wrong field types naming the field, and the union cannot be instantiated.

    Catches: a runner's ``match status.reason`` falling through; statuses that cannot
    cross a process boundary.
    """
    reason = ExitReason.RequestedShutdown(ShutdownReason.RpcRequested())
    match reason:
        case ExitReason.RequestedShutdown(ShutdownReason.RpcRequested()):
            matched = True
        case _:
            matched = False
    assert matched
    assert reason == ExitReason.RequestedShutdown(ShutdownReason.RpcRequested())
    assert reason != ExitReason.RunCompleted()
    for picklable in (
        reason,
        ExitReason.RunCompleted(),
        ExitReason.RunError(ValueError("x")),
    ):
        back = pickle.loads(pickle.dumps(ExitStatus(picklable)))
        assert type(back.reason) is type(picklable)
    assert repr(ExitStatus(ExitReason.RunCompleted())) == (
        "ExitStatus(reason=ExitReason.RunCompleted())"
    )
    with pytest.raises(TypeError, match=r"`reason` must be a dig_service\.ShutdownReason"):
        ExitReason.RequestedShutdown("user")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`error` must be an exception instance"):
        ExitReason.RunError("boom")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`reason` must be a dig_service\.ExitReason"):
        ExitStatus(ShutdownReason.UserRequested())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use a variant"):
        ExitReason()


# --------------------------------------------------------------------------- ServiceConfig


def test_service_config_defaults_and_timedelta() -> None:
    """Proves: defaults are a 30 s deadline and no hook timeout; a ``timedelta`` is
    accepted for both fields and stored as float seconds; configs compare by value.

    Catches: a timedelta stored as is (then ``loop.call_later(timedelta)`` fails late).
    """
    assert ServiceConfig() == ServiceConfig(shutdown_deadline=30.0, hook_timeout=None)
    config = ServiceConfig(timedelta(seconds=5), timedelta(milliseconds=250))
    assert config.shutdown_deadline == 5.0 and config.hook_timeout == 0.25
    assert isinstance(config.shutdown_deadline, float)
    assert ServiceConfig(shutdown_deadline=0).shutdown_deadline == 0.0
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.shutdown_deadline = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("field", ["shutdown_deadline", "hook_timeout", "stop_reserve"])
@pytest.mark.parametrize(
    "bad", [-1.0, math.nan, math.inf, -math.inf, timedelta(seconds=-1)], ids=repr
)
def test_service_config_rejects_negative_nan_and_infinite_values(field: str, bad: object) -> None:
    """Proves: a negative, NaN or infinite duration (float or timedelta) is a
    ``ValueError`` naming the field.

    Catches: ``NaN`` comparisons making every deadline check false (a shutdown that
    never times out), or a negative deadline firing at once.
    """
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number of seconds >= 0"):
        ServiceConfig(**{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["shutdown_deadline", "hook_timeout", "stop_reserve"])
@pytest.mark.parametrize("bad", ["30", True, [1]], ids=repr)
def test_service_config_rejects_non_numbers(field: str, bad: object) -> None:
    """Proves: a non-number (including ``bool``) is a ``TypeError`` naming the field.

    Catches: ``"30"`` from an env var or ``True`` slipping through as 1 second.
    """
    with pytest.raises(TypeError, match=f"`{field}` must be a number of seconds"):
        ServiceConfig(**{field: bad})  # type: ignore[arg-type]


def test_service_config_rejects_a_zero_hook_timeout() -> None:
    """Proves: ``hook_timeout=0`` is a ``ValueError`` that points at ``None`` for "no limit".

    Catches: a config where every hook times out at once.
    """
    with pytest.raises(ValueError, match=r"`hook_timeout` must be > 0 .*use None for no limit"):
        ServiceConfig(hook_timeout=0)


def test_stop_reserve_defaults_to_a_quarter_of_the_deadline_capped_at_5s() -> None:
    """Proves: ``stop_reserve`` defaults to ``min(5, shutdown_deadline / 4)``, takes a
    ``timedelta``, may equal the deadline, survives a pickle, and ``run`` and the join
    get the rest of the budget.

    Catches: a default reserve larger than a short deadline (a budget with no room for
    the join), or a reserve lost when a config crosses a process boundary."""
    assert ServiceConfig().stop_reserve == 5.0
    assert ServiceConfig(shutdown_deadline=8).stop_reserve == 2.0
    assert ServiceConfig(shutdown_deadline=0).stop_reserve == 0.0
    config = ServiceConfig(2.0, stop_reserve=timedelta(milliseconds=500))
    assert config.stop_reserve == 0.5 and config.run_and_join_budget == 1.5
    assert ServiceConfig(2.0, stop_reserve=2.0).run_and_join_budget == 0.0
    back = pickle.loads(pickle.dumps(config))
    assert back == config and back.stop_reserve == 0.5


def test_a_stop_reserve_larger_than_the_deadline_is_a_value_error_naming_it() -> None:
    """Proves: ``stop_reserve > shutdown_deadline`` is a ``ValueError`` naming the
    parameter (and the deadline it exceeds).

    Catches: a reserve that silently makes the budget negative (run and the join cut at
    once) or exceeds the supervisor's grace period."""
    with pytest.raises(
        ValueError, match=r"`stop_reserve` \(3s\) must not exceed `shutdown_deadline`"
    ):
        ServiceConfig(shutdown_deadline=2.0, stop_reserve=3.0)


# --------------------------------------------------------------------------- ShutdownReport


def _report() -> ShutdownReport:
    return ShutdownReport(
        reason=ShutdownReason.Fatal("disk on fire"),
        total=1.8,
        tasks_at_start=3,
        phases=[
            PhaseReport("run", 0.0, "ok"),
            PhaseReport("join", 1.5, "timed_out"),
            PhaseReport("on_stop", 0.3, "ok"),
            PhaseReport("post_stop", 0.0, "skipped"),
        ],
        stragglers=[
            StragglerReport("peer-7", TaskKind.PeerConnection, "python", 12.5, 'File "x.py"'),
            StragglerReport("sync", TaskKind.BackgroundLoop, "native", 3.0, None),
        ],
    )


def test_report_to_dict_is_json_and_the_text_names_every_stage_and_straggler() -> None:
    """Proves: ``to_dict()`` goes through ``json.dumps`` as is and round-trips through
    ``json.loads`` with every field; the text form names the reason, the total, each stage
    and each straggler (a Python one with its stack, a native one said to have none).

    Catches: a report with a ``TaskKind`` or ``ShutdownReason`` object in its dict (a
    JSON log pipeline that crashes on the one record that matters), or a text form that
    drops stragglers."""
    report = _report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data == {
        "reason": {"kind": "Fatal", "message": "disk on fire"},
        "total": 1.8,
        "tasks_at_start": 3,
        "phases": [
            {"name": "run", "duration": 0.0, "outcome": "ok"},
            {"name": "join", "duration": 1.5, "outcome": "timed_out"},
            {"name": "on_stop", "duration": 0.3, "outcome": "ok"},
            {"name": "post_stop", "duration": 0.0, "outcome": "skipped"},
        ],
        "stragglers": [
            {
                "name": "peer-7",
                "kind": "PeerConnection",
                "origin": "python",
                "age": 12.5,
                "stack": 'File "x.py"',
            },
            {
                "name": "sync",
                "kind": "BackgroundLoop",
                "origin": "native",
                "age": 3.0,
                "stack": None,
            },
        ],
    }
    text = str(report)
    assert text.startswith("shutdown (fatal: disk on fire) took 1.80s; 3 task(s)"), text
    assert "\n  join          1.50s  timed_out" in text
    assert '- peer-7 (PeerConnection, python, age 12.5s), awaiting in:\n      File "x.py"' in text
    assert "- sync (BackgroundLoop, native, age 3.0s): a native tokio task, no stack" in text
    assert report.phase("on_stop") == PhaseReport("on_stop", 0.3, "ok")


def test_exit_status_carries_its_report_outside_its_value() -> None:
    """Proves: ``ExitStatus(reason, report=...)`` keeps the report (also through a
    pickle) without making it part of the status's value; a report that is not a
    ``ShutdownReport`` is a ``TypeError`` naming ``report``.

    Catches: two identical outcomes comparing unequal because their timings differ, or
    a report dropped when a status is pickled to another process."""
    report = _report()
    status = ExitStatus(ExitReason.RunCompleted(), report=report)
    assert status.report is report
    assert status == ExitStatus(ExitReason.RunCompleted())
    assert ExitStatus(ExitReason.RunCompleted()).report is None
    assert pickle.loads(pickle.dumps(status)).report == report
    with pytest.raises(TypeError, match="`report`"):
        ExitStatus(ExitReason.RunCompleted(), report={"total": 1})  # type: ignore[arg-type]
