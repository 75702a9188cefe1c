"""The ``start()`` contract table, ``contract/start.toml``, run against the Python ``Service``.

Every row of the table is one test here, named by the row (and run on asyncio
and uvloop); ``rust/tests/contract.rs`` runs the same rows against the Rust
``Service``. This module only translates the table's words (its header
defines them) into a node, a shutdown trigger and checks: what a row
expects is written in the table, never here, so the two implementations are
held to one contract.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dig_service import (
    ExitReason,
    ExitStatus,
    NodeLifecycle,
    RunContext,
    Service,
    ServiceConfig,
    ServiceError,
    ServiceHandle,
    ShutdownDeadlineExceeded,
    ShutdownReason,
    ShutdownReport,
    ShutdownToken,
    StartContext,
    StopContext,
    TaskKind,
)

TABLE = Path(__file__).resolve().parent.parent / "contract" / "start.toml"
ROWS: list[dict[str, Any]] = tomllib.loads(TABLE.read_text())["row"]
EDGE_HOOKS = ("pre_start", "on_start", "on_stop", "post_stop")
HOOKS = ("pre_start", "on_start", "run", "on_stop", "post_stop")


class InjectedFailure(Exception):
    """The error a hook or a task raises when the table says ``"fail"``."""


def make_reason(name: str) -> ShutdownReason:
    """The table's reason word as a ``ShutdownReason`` (a Fatal says "requested")."""
    if name == "Fatal":
        return ShutdownReason.Fatal("requested")
    reason: ShutdownReason = getattr(ShutdownReason, name)()
    return reason


class ContractNode(NodeLifecycle):
    """A node whose hooks and tasks do what a table row's ``[row.node]`` says."""

    NAME = "contract"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.calls: list[str] = []
        # The hooks that ran to their end (returned by themselves).
        self.finished: list[str] = []
        self.entered = {hook: asyncio.Event() for hook in HOOKS}
        self.injected: dict[str, InjectedFailure] = {}
        # Ends every "shielded" wait once the row is over, so that no task
        # outlives the test.
        self.release = asyncio.Event()
        self.handle: ServiceHandle | None = None
        # The row's `shutdown.reason`, for the `run` acts that fire the token themselves.
        self.reason: ShutdownReason = ShutdownReason.UserRequested()

    def _enter(self, hook: str, ctx: StartContext | RunContext | StopContext) -> None:
        self.calls.append(hook)
        for task in self.spec.get("tasks", []):
            if task.get("spawn_in", "pre_start") == hook:
                ctx.tasks.spawn(
                    task["name"],
                    TaskKind.BackgroundLoop,
                    self._task(task["name"], task["does"], ctx.shutdown),
                    critical=task.get("critical", False),
                )
        self.entered[hook].set()

    def _fail(self, what: str) -> InjectedFailure:
        exc = InjectedFailure(f"{what} failure injected")
        self.injected[what] = exc
        return exc

    async def _shielded(self) -> None:
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                continue

    async def _act(self, hook: str, ctx: StartContext | RunContext | StopContext) -> None:
        self._enter(hook, ctx)
        act: str = self.spec.get(hook, "ok")
        if act == "ok":
            self.finished.append(hook)
            return
        if act == "fail":
            raise self._fail(hook)
        if act == "hang":
            await asyncio.Event().wait()
        elif act == "hang_shielded":
            await self._shielded()
        elif act == "wait_shutdown":
            await ctx.shutdown.cancelled()
        elif act.startswith("sleep:"):
            await asyncio.sleep(float(act.removeprefix("sleep:")))
        else:
            raise AssertionError(f"unknown act {act!r} for {hook}")
        self.finished.append(hook)

    async def _task(self, name: str, does: str, shutdown: ShutdownToken) -> None:
        if does == "until_shutdown":
            await shutdown.cancelled()
        elif does == "ignore_shutdown":
            await asyncio.Event().wait()
        elif does == "ignore_shutdown_shielded":
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    continue
        elif does == "fail":
            raise self._fail(f"task {name}")
        elif does != "return":
            raise AssertionError(f"unknown task behaviour {does!r}")

    async def pre_start(self, ctx: StartContext) -> None:
        await self._act("pre_start", ctx)

    async def on_start(self, ctx: StartContext) -> None:
        await self._act("on_start", ctx)

    async def run(self, ctx: RunContext) -> None:
        self._enter("run", ctx)
        act: str = self.spec.get("run", "until_shutdown")
        if act == "until_shutdown":
            await ctx.shutdown.cancelled()
        elif act == "fail":
            raise self._fail("run")
        elif act == "ignore_shutdown":
            await asyncio.Event().wait()
        elif act == "ignore_shutdown_shielded":
            await self._shielded()
        elif act == "race":
            assert self.handle is not None
            threading.Thread(
                target=self.handle.request_shutdown, args=(self.reason,), daemon=True
            ).start()
        elif act == "request_shutdown":
            ctx.shutdown.cancel(self.reason)
        elif act != "return":
            raise AssertionError(f"unknown run act {act!r}")
        self.finished.append("run")

    async def on_stop(self, ctx: StopContext) -> None:
        await self._act("on_stop", ctx)

    async def post_stop(self, ctx: StopContext) -> None:
        await self._act("post_stop", ctx)


def request(handle: ServiceHandle, reason: ShutdownReason, origin: str) -> None:
    """Request shutdown through ``handle``, from the loop or from a new OS thread."""
    if origin == "thread":
        thread = threading.Thread(target=handle.request_shutdown, args=(reason,))
        thread.start()
        thread.join()
    else:
        assert origin == "loop", origin
        handle.request_shutdown(reason)


async def play(row: dict[str, Any]) -> None:
    """Run ``row`` once against a fresh ``Service`` and check what it expects."""
    node_spec: dict[str, Any] = row.get("node", {})
    shutdown: dict[str, Any] = row.get("shutdown", {})
    expect: dict[str, Any] = row["expect"]
    config: dict[str, Any] = {"shutdown_deadline": 5.0, **row.get("config", {})}

    node = ContractNode(node_spec)
    service = Service(node, config=ServiceConfig(**config))
    handle = node.handle = service.handle()
    reason = make_reason(shutdown.get("reason", "UserRequested"))
    node.reason = reason
    at: str | None = shutdown.get("at")
    via: str = shutdown.get("via", "request")
    origin: str = shutdown.get("from", "loop")

    requested_at: float | None = None
    if at == "before_start":
        requested_at = time.monotonic()
        request(handle, reason, origin)
    starting = asyncio.ensure_future(service.start())
    if at is not None and at != "before_start":
        entered = asyncio.ensure_future(node.entered[at].wait())
        await asyncio.wait((starting, entered), return_when=asyncio.FIRST_COMPLETED)
        if not entered.done():
            entered.cancel()
            pytest.fail(f"the row requests shutdown in `{at}`, but start() returned first")
        requested_at = time.monotonic()
        if via == "cancel_start":
            starting.cancel()
        else:
            request(handle, reason, origin)

    outcome: ExitStatus | BaseException | str
    try:
        outcome = await starting
    except asyncio.CancelledError:
        if via != "cancel_start":
            raise
        outcome = "cancelled"
    except ServiceError as err:
        outcome = err
    elapsed = None if requested_at is None else time.monotonic() - requested_at
    try:
        await check(row, expect, node, service, outcome, elapsed)
    finally:
        node.release.set()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=5.0)


async def check(
    row: dict[str, Any],
    expect: dict[str, Any],
    node: ContractNode,
    service: Service[ContractNode, None, None],
    outcome: ExitStatus | BaseException | str,
    elapsed: float | None,
) -> None:
    assert node.calls == expect["hooks"], f"hooks run: {node.calls}"
    if "finished" in expect:
        assert node.finished == expect["finished"], f"hooks that ran to their end: {node.finished}"
    if "elapsed" in expect:
        assert elapsed is not None, "the row expects a time but requests no shutdown"
        bounds = expect["elapsed"]
        assert bounds["min"] <= elapsed <= bounds["max"], f"{elapsed:.3f}s, expected {bounds}"

    result: str = expect["result"]
    if result == "AlreadyRunning":
        assert isinstance(outcome, ExitStatus), outcome
        with pytest.raises(ServiceError) as info:
            await service.start()
        assert type(info.value).__name__ == "AlreadyRunning"
        return
    assert not row.get("start_twice"), "start_twice rows expect AlreadyRunning"

    status: ExitStatus | None = None
    error: BaseException | None = None
    if result == "cancelled":
        assert outcome == "cancelled", f"start() was not cancelled: {outcome!r}"
        # What the service recorded as it wound down.
        try:
            status = await service.wait_for_exit()
        except ServiceError as err:
            error = err
        if "waited" in expect:
            assert type(error).__name__ == expect["waited"], f"wait_for_exit(): {status or error!r}"
        else:
            assert status is not None, f"wait_for_exit() raised {error!r}"
    elif result == "ok":
        assert isinstance(outcome, ExitStatus), f"start() raised {outcome!r}"
        status = outcome
    else:
        assert isinstance(outcome, ServiceError), f"start() returned {outcome!r}"
        assert type(outcome).__name__ == result, repr(outcome)
        error = outcome

    token_reason = service.shutdown_token.reason()
    if "exit" in expect:
        assert status is not None, "the row expects an exit status"
        check_exit(expect["exit"], status, token_reason)
    if "exit_code" in expect:
        assert status is not None
        assert status.exit_code == expect["exit_code"]
    if "cause" in expect:
        assert error is not None
        check_cause(expect["cause"], error, node)
    if "pending" in expect:
        assert isinstance(error, ShutdownDeadlineExceeded), repr(error)
        assert error.pending_names == expect["pending"]
        assert error.pending == len(expect["pending"])
    if "token" in expect:
        assert token_reason is not None
        assert type(token_reason).__name__ == expect["token"], repr(token_reason)
    if "stats" in expect:
        stats = service.tasks.stats()
        seen = {
            "completed": stats.completed,
            "failed": stats.failed,
            "stopped": stats.cancelled + stats.aborted,
        }
        assert seen == expect["stats"]
    if "report" in expect:
        report = (status.report if status is not None else None) or getattr(error, "report", None)
        check_report(expect["report"], report)
    # A task that swallows cancellation was cancelled and named, but lives on until it
    # stops swallowing (the row's end releases it): the one task allowed to be live.
    shielded = {
        t["name"]
        for t in row.get("node", {}).get("tasks", [])
        if t["does"] == "ignore_shutdown_shielded"
    }
    live = service.tasks.snapshot()
    assert all(t.name in shielded for t in live), live
    assert service.tasks.is_closed()


def check_report(want: str | dict[str, Any], report: ShutdownReport | None) -> None:
    if want == "none":
        assert report is None, report
        return
    assert isinstance(want, dict), want
    assert isinstance(report, ShutdownReport), f"no report: {report!r}"
    assert [p.name for p in report.phases] == ["run", "join", "on_stop", "post_stop"]
    for phase in report.phases:
        if phase.outcome == "skipped":
            assert phase.duration == 0.0, phase
    if "phases" in want:
        seen = {p.name: p.outcome for p in report.phases}
        assert seen == want["phases"], f"{report}"
    if "stragglers" in want:
        assert [s.name for s in report.stragglers] == want["stragglers"], f"{report}"
    if want.get("stacks"):
        for straggler in report.stragglers:
            assert straggler.origin == "python", straggler
            assert straggler.stack is not None and "in _task" in straggler.stack, straggler
    if "tasks_at_start" in want:
        assert report.tasks_at_start == want["tasks_at_start"], f"{report}"
    assert report.total >= 0.0
    json.dumps(report.to_dict())


def check_exit(word: str, status: ExitStatus, token_reason: ShutdownReason | None) -> None:
    if word == "consistent":
        assert token_reason is not None
        if token_reason == ShutdownReason.RequestedByRun():
            assert status.reason == ExitReason.RunCompleted()
        else:
            assert status.reason == ExitReason.RequestedShutdown(token_reason)
    elif word == "RunCompleted":
        assert status.reason == ExitReason.RunCompleted()
    else:
        variant = word.removeprefix("RequestedShutdown(").removesuffix(")")
        assert variant != word, f"unknown exit word {word!r}"
        assert isinstance(status.reason, ExitReason.RequestedShutdown), status
        assert type(status.reason.reason).__name__ == variant, status


def check_cause(word: str, error: BaseException, node: ContractNode) -> None:
    kind, _, hook = word.partition(":")
    cause = error.__cause__
    if kind == "injected":
        assert cause is node.injected[hook], f"cause {cause!r}"
    else:
        assert kind == "timeout", word
        assert isinstance(cause, TimeoutError), f"cause {cause!r}"
        assert f"`{hook}`" in str(cause), str(cause)


@pytest.mark.asyncio
@pytest.mark.parametrize("row", ROWS, ids=[row["name"] for row in ROWS])
async def test_contract_row(row: dict[str, Any]) -> None:
    """Proves: the Python ``Service`` does what the contract table's row says (hooks
    run, result, exit status, cause, stragglers, token, task counts), every time.

    Catches: any drift of the Python lifecycle from the contract the Rust crate is
    held to by the same rows (``rust/tests/contract.rs``).
    """
    for _ in range(row.get("repeat", 1)):
        await play(row)


def test_table_rows_are_well_formed() -> None:
    """Proves: every row has a unique name, a SPEC sentence and the keys the drivers
    need, and uses only the table's vocabulary.

    Catches: a typo in the table that a driver would silently read as a default.
    """
    names = [row["name"] for row in ROWS]
    assert len(names) == len(set(names))
    allowed_row = {"name", "spec", "node", "shutdown", "config", "expect", "start_twice", "repeat"}
    allowed_expect = {
        "hooks", "result", "exit", "exit_code", "cause", "pending", "token", "stats", "waited",
        "finished", "elapsed", "report",
    }  # fmt: skip
    for row in ROWS:
        assert set(row) <= allowed_row, row["name"]
        assert row["spec"], row["name"]
        assert set(row["expect"]) <= allowed_expect, row["name"]
        assert {"hooks", "result"} <= set(row["expect"]), row["name"]
        assert set(row.get("node", {})) <= {*HOOKS, "tasks"}, row["name"]
        assert set(row.get("shutdown", {})) <= {"at", "reason", "from", "via"}, row["name"]
        assert set(row.get("config", {})) <= {
            "shutdown_deadline", "hook_timeout", "stop_reserve"
        }, row["name"]  # fmt: skip
        report = row["expect"].get("report", "none")
        assert report == "none" or set(report) <= {
            "phases", "stragglers", "stacks", "tasks_at_start"
        }, row["name"]  # fmt: skip
