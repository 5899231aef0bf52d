"""A synchronous QMP channel over qemu.qmp, on an event loop thread of its own.

qemu.qmp is asyncio; the rest of the harness (paramiko, pytest) is synchronous.  Each
channel owns one loop in one thread and offers blocking calls with timeouts, so the harness
never depends on whatever event loop the caller may have.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from harness.errors import HarnessError

T = TypeVar("T")


class QmpError(HarnessError):
    """A QMP command failed or the monitor went away."""

    exit_code = 4

    def __init__(self, command: str, reason: str, error_class: str | None = None) -> None:
        self.command = command
        self.reason = reason
        self.error_class = error_class
        super().__init__(f"QMP {command}: {reason}")


class QmpChannel:
    def __init__(self, name: str, logger: logging.Logger) -> None:
        self.name = name
        self._log = logger
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client = QMPClient(name)
        self._pump: asyncio.Task[None] | None = None
        self.events: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"<QmpChannel {self.name} {self._client.runstate.name}>"

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        if self._loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise QmpError("call", "the QMP channel is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def connect(self, sock: socket.socket, timeout: float = 10.0) -> None:
        try:
            self._call(self._client.connect(sock), timeout)
        except (ConnectError, OSError, concurrent.futures.TimeoutError) as exc:
            raise QmpError("connect", f"no QMP greeting: {exc}") from exc
        self._call(self._start_pump(), timeout)

    async def _start_pump(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def _shutdown(self) -> None:
        try:
            await self._client.disconnect()
        finally:
            if self._pump is not None:
                self._pump.cancel()
                await asyncio.gather(self._pump, return_exceptions=True)

    async def _pump_events(self) -> None:
        async for event in self._client.events:
            self.events.append(dict(event))
            self._log.debug("QMP event %s", event.get("event"))

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
        self._log.debug("QMP -> %s %s", command, arguments or "")
        try:
            result = self._call(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QmpError(command, str(exc), exc.error_class) from exc
        except concurrent.futures.TimeoutError as exc:  # an OSError since 3.11: first
            raise QmpError(command, f"no answer within {timeout:g} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(command, f"{type(exc).__name__}: {exc}") from exc
        self._log.debug("QMP <- %s", result)
        return result

    def hmp(self, command_line: str, timeout: float = 10.0) -> str:
        result = self.execute("human-monitor-command", {"command-line": command_line}, timeout)
        return str(result)

    def close(self) -> None:
        """Disconnect and stop the loop thread; safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._shutdown(), 5.0)
        except Exception as exc:  # noqa: BLE001 - teardown must go on; the cause is logged
            self._log.debug("QMP disconnect: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
