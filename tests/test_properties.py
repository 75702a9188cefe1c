"""Property tests of ``Service.start()`` (hypothesis): any interleaving of shutdown
requests, task completions, task failures and hook failures ends as the contract table
of SPEC section 3 prescribes.

A scenario is a node whose hooks fail on demand, the tasks its ``on_start`` spawns
(each completes or fails, is critical or not, stops on the token or ignores it) and a
list of *steps* that a driver plays while ``run`` is running: a shutdown request (from
the service, from a handle, or from another thread), "task i ends now", or "``run``
returns/raises now". :class:`Model` predicts, from the scenario alone, the exit status
or the error, the hooks that ran, the registry's counters and the stragglers; the test
checks the service against it, and checks that afterwards no tracked task is running
and every injected exception was raised (as the ``__cause__`` of the error) or logged.

Examples are derandomized (the same ones on every run, so CI is stable) and few enough
that the file runs in seconds on both event loops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from _support import loop_kinds, uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dig_service import (
    ExitReason,
    ExitStatus,
    NodeLifecycle,
    OnStartFailed,
    OnStopFailed,
    PreStartFailed,
    RunContext,
    RunFailed,
    Service,
    ServiceConfig,
    ServiceError,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    StartContext,
    StopContext,
    TaskHandle,
    TaskKind,
)

DEADLINE = 0.1
"""The shutdown deadline: stragglers cost this much per example."""
WAIT = 10.0

REASONS = [
    ShutdownReason.UserRequested(),
    ShutdownReason.RpcRequested(),
    ShutdownReason.ReloadRequested(),
    ShutdownReason.Fatal("operator says stop"),
]

LOOPS = {
    "asyncio": asyncio.new_event_loop,
    **({"uvloop": uvloop.new_event_loop} if uvloop is not None else {}),
}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class TaskSpec:
    fails: bool
    critical: bool
    honors_shutdown: bool


@dataclass(frozen=True)
class Shutdown:
    reason: int
    via: Literal["service", "handle", "thread"]


@dataclass(frozen=True)
class TaskEnds:
    index: int


@dataclass(frozen=True)
class RunEnds:
    pass


Step = Shutdown | TaskEnds | RunEnds


@dataclass(frozen=True)
class Scenario:
    fail_pre_start: bool
    fail_on_start: bool
    run: Literal["until_shutdown", "returns", "raises"]
    fail_on_stop: bool
    fail_post_stop: bool
    tasks: tuple[TaskSpec, ...]
    steps: tuple[Step, ...]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tasks = tuple(
        draw(st.lists(st.builds(TaskSpec, st.booleans(), st.booleans(), st.booleans()), max_size=4))
    )
    run: Literal["until_shutdown", "returns", "raises"] = draw(
        st.sampled_from(["until_shutdown", "returns", "raises"])
    )
    step = st.one_of(
        st.builds(
            Shutdown,
            st.integers(0, len(REASONS) - 1),
            st.sampled_from(["service", "handle", "thread"]),
        ),
        *([st.builds(TaskEnds, st.integers(0, len(tasks) - 1))] if tasks else []),
        *([st.just(RunEnds())] if run != "until_shutdown" else []),
    )
    # Hook failures are the exception, not the rule: most examples reach `run`.
    rare = st.sampled_from([False, False, False, False, True])
    return Scenario(
        fail_pre_start=draw(rare),
        fail_on_start=draw(rare),
        run=run,
        fail_on_stop=draw(rare),
        fail_post_stop=draw(rare),
        tasks=tasks,
        steps=tuple(draw(st.lists(step, max_size=6))),
    )


# --------------------------------------------------------------------------- the model


@dataclass
class Model:
    """What the contract prescribes for a scenario."""

    hooks: list[str]
    error: type[ServiceError] | None
    exit_reason: ExitReason | None
    token_reason: ShutdownReason | Literal["fatal"]
    """The token's final reason; ``"fatal"``: some ``Fatal(...)`` set by the service."""
    fatal_mentions: str | None
    """A word the ``Fatal`` message must contain (the task name or the hook)."""
    completed: int = 0
    failed: int = 0
    stragglers: list[str] = field(default_factory=list)
    played: list[Step] = field(default_factory=list)
    """The steps the driver plays (the others come after ``run`` ended: skipped)."""

    @classmethod
    def of(cls, sc: Scenario) -> Model:
        if sc.fail_pre_start:
            return cls(["pre_start"], PreStartFailed, None, "fatal", "pre_start")
        ended_tasks: set[int] = set()
        completed = failed = 0

        def wind_down() -> list[str]:
            nonlocal completed, failed
            stragglers = []
            for i, spec in enumerate(sc.tasks):
                if i in ended_tasks:
                    continue
                if spec.honors_shutdown:
                    failed += spec.fails
                    completed += not spec.fails
                else:
                    stragglers.append(task_name(i))
            return stragglers

        if sc.fail_on_start:
            stragglers = wind_down()
            hooks = ["pre_start", "on_start", "post_stop"]
            m = cls(hooks, OnStartFailed, None, "fatal", "on_start", completed, failed, stragglers)
            return m

        reason: ShutdownReason | Literal["fatal"] | None = None
        fatal_mentions: str | None = None
        ended_by: Literal["token", "run"] | None = None
        played: list[Step] = []
        for step in sc.steps:
            if isinstance(step, Shutdown):
                played.append(step)
                if reason is None:
                    reason = REASONS[step.reason]
                ended_by = ended_by or "token"
            elif ended_by is not None:
                continue  # run has ended: the driver skips it
            elif isinstance(step, TaskEnds):
                if step.index in ended_tasks:
                    continue  # already ended: nothing to play
                played.append(step)
                ended_tasks.add(step.index)
                spec = sc.tasks[step.index]
                failed += spec.fails
                completed += not spec.fails
                if spec.critical:  # failed, or returned while the service runs
                    reason, fatal_mentions, ended_by = "fatal", task_name(step.index), "token"
            else:
                played.append(step)
                ended_by = "run"
        if ended_by is None:  # the driver ends it: a final request
            played.append(Shutdown(0, "service"))
            reason, ended_by = REASONS[0], "token"

        error: type[ServiceError] | None = None
        exit_reason: ExitReason
        if ended_by == "run" and sc.run == "raises":
            error = RunFailed
            exit_reason = ExitReason.RunError(RuntimeError("placeholder"))
            if reason is None:
                reason, fatal_mentions = "fatal", "run failed"
        elif reason is None:
            exit_reason = ExitReason.RunCompleted()
            reason = ShutdownReason.RequestedByRun()
        elif reason == "fatal":
            exit_reason = ExitReason.RequestedShutdown(ShutdownReason.Fatal("any"))
        else:
            exit_reason = ExitReason.RequestedShutdown(reason)

        stragglers = wind_down()
        if error is None:
            if sc.fail_on_stop or sc.fail_post_stop:
                error = OnStopFailed
            elif stragglers:
                error = ShutdownDeadlineExceeded
        hooks = ["pre_start", "on_start", "run", "on_stop", "post_stop"]
        return cls(
            hooks,
            error,
            exit_reason,
            reason,
            fatal_mentions,
            completed,
            failed,
            stragglers,
            played,
        )


def task_name(i: int) -> str:
    return f"task-{i}"


# --------------------------------------------------------------------------- the service


class Injected(Exception):
    """An injected failure; ``where`` says which hook or task raised it."""

    def __init__(self, where: str) -> None:
        super().__init__(f"{where} failure injected")
        self.where = where


class ScenarioNode(NodeLifecycle):
    NAME = "prop"

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.calls: list[str] = []
        self.injected: list[Injected] = []
        self.run_started = asyncio.Event()
        self.run_go = asyncio.Event()
        self.task_go = [asyncio.Event() for _ in sc.tasks]
        self.handles: list[TaskHandle] = []

    def _fail(self, where: str) -> Injected:
        exc = Injected(where)
        self.injected.append(exc)
        return exc

    async def pre_start(self, ctx: StartContext) -> None:
        self.calls.append("pre_start")
        if self.sc.fail_pre_start:
            raise self._fail("pre_start")

    async def on_start(self, ctx: StartContext) -> None:
        self.calls.append("on_start")
        for i, spec in enumerate(self.sc.tasks):
            coro = self._task(ctx, i, spec)
            self.handles.append(ctx.tasks.spawn(task_name(i), BG, coro, critical=spec.critical))
        if self.sc.fail_on_start:
            raise self._fail("on_start")

    async def _task(self, ctx: StartContext, i: int, spec: TaskSpec) -> None:
        go = self.task_go[i]
        if spec.honors_shutdown:
            await _first(go.wait(), ctx.shutdown.cancelled())
        else:
            await go.wait()
        if spec.fails:
            raise self._fail(task_name(i))

    async def run(self, ctx: RunContext) -> None:
        self.calls.append("run")
        self.run_started.set()
        await _first(self.run_go.wait(), ctx.shutdown.cancelled())
        if self.run_go.is_set() and self.sc.run == "raises":
            raise self._fail("run")

    async def on_stop(self, ctx: StopContext) -> None:
        self.calls.append("on_stop")
        if self.sc.fail_on_stop:
            raise self._fail("on_stop")

    async def post_stop(self, ctx: StopContext) -> None:
        self.calls.append("post_stop")
        if self.sc.fail_post_stop:
            raise self._fail("post_stop")


BG = TaskKind.BackgroundLoop


async def _first(*coros: Any) -> None:
    """Wait for the first of ``coros``; cancel (and reap) the others, even when cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def play(service: Service[ScenarioNode, None, None], model: Model) -> Any:
    """Start the service, play the model's steps while ``run`` runs; return the outcome."""
    node = service.node
    runner = asyncio.ensure_future(service.start())
    started = asyncio.ensure_future(node.run_started.wait())
    await asyncio.wait((runner, started), return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    await asyncio.gather(started, return_exceptions=True)
    if node.run_started.is_set():
        handle = service.handle()
        for step in model.played:
            if isinstance(step, Shutdown):
                reason = REASONS[step.reason]
                if step.via == "service":
                    service.request_shutdown(reason)
                elif step.via == "handle":
                    handle.request_shutdown(reason)
                else:
                    t = threading.Thread(target=handle.request_shutdown, args=(reason,))
                    t.start()
                    t.join(WAIT)
            elif isinstance(step, TaskEnds):
                node.task_go[step.index].set()
                # Its done callback (counting, critical handling) runs before this resumes.
                await asyncio.gather(node.handles[step.index], return_exceptions=True)
            else:
                node.run_go.set()
    try:
        return await asyncio.wait_for(runner, WAIT)
    except ServiceError as err:
        return err


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def dig_logs() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("dig_service")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__


def check(
    sc: Scenario, outcome: Any, service: Service[ScenarioNode, None, None], logs: Records
) -> None:
    model = Model.of(sc)
    node = service.node
    assert node.calls == model.hooks

    # The exit status, or the error, the table prescribes.
    if model.error is None:
        assert isinstance(outcome, ExitStatus), outcome
        assert outcome.exit_code == (0 if outcome.is_graceful() else 1)
        if model.token_reason == "fatal":
            assert isinstance(outcome.reason, ExitReason.RequestedShutdown)
            assert isinstance(outcome.reason.reason, ShutdownReason.Fatal)
            assert not outcome.is_graceful()
        else:
            assert outcome.reason == model.exit_reason
    else:
        assert type(outcome) is model.error, (outcome, model)
        if isinstance(outcome, ShutdownDeadlineExceeded):
            assert outcome.pending_names == model.stragglers
        else:
            assert isinstance(outcome.__cause__, Injected)

    # The token's reason.
    reason = service.shutdown_token.reason()
    if model.token_reason == "fatal":
        assert isinstance(reason, ShutdownReason.Fatal), reason
        assert model.fatal_mentions is not None and model.fatal_mentions in reason.message
    else:
        assert reason == model.token_reason

    # No tracked task left running; exact counts.
    assert all(h.is_finished() for h in node.handles)
    stats = service.tasks.stats()
    assert (stats.spawned, stats.completed, stats.failed, stats.cancelled, stats.live) == (
        len(node.handles),
        model.completed,
        model.failed,
        len(model.stragglers),
        0,
    ), (stats, model)

    # Every injected exception was raised (as the cause of the error) or logged.
    raised = set(map(id, _causes(outcome if isinstance(outcome, BaseException) else None)))
    logged = {
        id(exc)
        for r in logs.records
        if r.exc_info and r.exc_info[1] is not None
        for exc in _causes(r.exc_info[1])
    }
    for exc in node.injected:
        assert id(exc) in raised | logged, f"{exc.where}: neither raised nor logged"


@pytest.mark.parametrize("loop", loop_kinds("asyncio", "uvloop"))
@settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sc=scenarios())
def test_any_interleaving_ends_as_the_contract_says(
    loop: str, sc: Scenario, dig_logs: Records
) -> None:
    """Proves: for any scenario (hook failures, tasks that complete or fail, critical or
    not, obedient or stubborn, and any interleaving of shutdown requests from the
    service, a handle or another thread, task endings and ``run`` returning or raising),
    ``start()`` returns the ``ExitStatus`` or raises the ``ServiceError`` the contract
    table prescribes (with its priority run > on_stop > post_stop > join), the hooks
    that ran are exactly the prescribed ones, the token's reason is the first one given
    (or the service's ``Fatal``), the registry's counters are exact with nothing left
    running, and every injected exception was raised or logged.

    Catches: any divergence from the table for a combination the example-based tests
    do not spell out (e.g. a critical task failing after a shutdown request, a request
    racing ``run``'s own return, a stubborn task alongside a failing ``on_stop``), and
    any exception that disappears on one of those paths.
    """
    dig_logs.records.clear()
    errors: list[dict[str, Any]] = []

    def factory() -> asyncio.AbstractEventLoop:
        lp = LOOPS[loop]()
        lp.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        return lp

    service = Service(ScenarioNode(sc), config=ServiceConfig(shutdown_deadline=DEADLINE))
    with asyncio.Runner(loop_factory=factory) as runner:
        outcome = runner.run(play(service, Model.of(sc)))
    assert not errors, errors
    check(sc, outcome, service, dig_logs)
