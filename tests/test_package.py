"""The package surface: exported names, import cost, and static typing.

Issue 3 "Done when": ``mypy --strict`` passes on a typed example that uses
``Service[MyNode, None, MyRpc]``; the public API of SPEC section 3 is
importable from ``dig_service``; ``import dig_service`` stays cheap.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dig_service

ROOT = Path(__file__).resolve().parent.parent

# Every name SPEC section 3 spells, module by module.
SPEC_NAMES = {
    # Lifecycle
    "NodeLifecycle",
    "PeerApi",
    "RpcApi",
    "PeerInfo",
    "InboundMessage",
    "DisconnectReason",
    "JsonRpcError",
    "StartContext",
    "RunContext",
    "StopContext",
    # Service
    "Service",
    "ServiceConfig",
    # Shutdown
    "ShutdownToken",
    "ShutdownReason",
    "ExitReason",
    "ExitStatus",
    # Tasks
    "TaskKind",
    "TaskRegistry",
    "TaskHandle",
    "TaskSummary",
    "TaskStats",
    # Handle
    "ServiceHandle",
    # Errors
    "ServiceError",
    "PreStartFailed",
    "OnStartFailed",
    "RunFailed",
    "OnStopFailed",
    "ShutdownDeadlineExceeded",
    "AlreadyRunning",
    "AlreadyStopped",
    # Running a service for real
    "run",
}


def test_every_spec_name_is_exported_and_resolves() -> None:
    """Proves: each public name of SPEC section 3 is in ``dig_service.__all__``, resolves
    through the lazy loader, and ``from dig_service import *`` binds them all; the
    error classes are ``ServiceError`` subclasses.

    Catches: a misspelt or forgotten export (users importing from private modules).
    """
    assert set(dig_service.__all__) >= SPEC_NAMES
    namespace: dict[str, object] = {}
    exec("from dig_service import *", namespace)
    for name in dig_service.__all__:
        assert getattr(dig_service, name) is namespace[name], name
    for name in ("PreStartFailed", "OnStartFailed", "RunFailed", "OnStopFailed",
                 "ShutdownDeadlineExceeded", "AlreadyRunning", "AlreadyStopped"):  # fmt: skip
        assert issubclass(getattr(dig_service, name), dig_service.ServiceError)
    assert set(dir(dig_service)) >= SPEC_NAMES
    with pytest.raises(AttributeError, match="no attribute 'Servcie'"):
        dig_service.Servcie  # noqa: B018
    from dig_service.testing import TestNode, spawn_native_sleeper

    assert callable(TestNode) and callable(spawn_native_sleeper)


def test_import_is_cheap_and_starts_nothing() -> None:
    """Proves: ``import dig_service`` imports neither asyncio nor the native core,
    starts no thread, and takes well under 50 ms (best of 5 fresh interpreters).

    Catches: an eager import chain (asyncio alone costs tens of ms) or a runtime
    started at import (SPEC P7: <= 50 ms, no thread until first use).
    """
    probe = textwrap.dedent(
        """
        import sys, threading, time
        t0 = time.perf_counter()
        import dig_service
        elapsed = time.perf_counter() - t0
        print(elapsed, threading.active_count(), "asyncio" in sys.modules,
              "dig_service._core" in sys.modules)
        """
    )
    runs = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
        runs.append(out)
        assert out[1:] == ["1", "False", "False"], out
    assert min(float(r[0]) for r in runs) < 0.050


def test_typed_example_passes_mypy_strict_with_the_expected_types() -> None:
    """Proves: ``tests/typed_example.py`` (a ``Service[MyNode, None, MyRpc]``) passes
    ``mypy --strict`` and mypy infers the node, ``None`` and the RPC type for the three
    properties.

    Catches: a ``Service`` that is not really generic (properties typed ``Any``), or
    stubs/annotations that make correct user code fail type checking.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "tests/typed_example.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'Revealed type is "typed_example.MyNode"' in proc.stdout
    assert 'Revealed type is "None"' in proc.stdout
    assert 'Revealed type is "typed_example.MyRpc"' in proc.stdout


def test_mypy_rejects_the_classic_mistakes(tmp_path: Path) -> None:
    """Proves: under ``mypy --strict`` a node with a sync hook, a string task kind, a
    string peer id and a wrong ``Service`` type argument are all type errors.

    Catches: signatures so loose (``Any``) that the type checker cannot help users.
    """
    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent(
            """
            from dig_service import (
                NodeLifecycle, PeerInfo, RpcApi, Service, ShutdownToken, StartContext,
                TaskRegistry,
            )

            class SyncHooks:
                def pre_start(self, ctx: StartContext) -> None: ...
                async def on_start(self, ctx: StartContext) -> None: ...
                async def run(self, ctx: object) -> None: ...
                async def on_stop(self, ctx: object) -> None: ...
                async def post_stop(self, ctx: object) -> None: ...

            async def work() -> None: ...

            Service(SyncHooks())  # line 16: sync hook
            TaskRegistry(ShutdownToken()).spawn("w", "background", work())  # line 17
            PeerInfo("ab" * 32, "1.2.3.4:1", "x")  # line 18
            s: Service[NodeLifecycle, None, RpcApi] = Service(NodeLifecycle(), rpc_api=1)  # 19
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    lines_with_errors = {
        int(line.split(":")[1]) for line in proc.stdout.splitlines() if ": error:" in line
    }
    assert {16, 17, 18, 19} <= lines_with_errors, proc.stdout


@pytest.mark.asyncio
async def test_typed_example_runs() -> None:
    """Proves: the typed example is also correct at runtime (it stops through its handle
    and exits 0) on both event loops.

    Catches: an example that type-checks but deadlocks.
    """
    import typed_example

    assert await typed_example.main() == 0
