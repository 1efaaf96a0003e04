"""Processes for CPU work that holds the interpreter lock.

Image operations in Pillow's C code let go of the lock, so threads serve them well. Work
made of many small steps in Python (the sandbox's drawing: shapes, colours, captions whose
text rendering keeps the lock) would instead take the interpreter from the event loop that
every execution shares, a millisecond or two at a time. Such work runs in a small pool of
processes of its own, started on first use and shared by every engine in this process.

Each process is a fresh interpreter (`python -m imagegraph.engine.processes`) that reads
calls from its stdin and writes answers to its stdout, one at a time: a module-level
function and plain values, pickled. Unlike `multiprocessing`, nothing of the parent is
imported again in the child (a script that starts an engine need not guard its main
module), and a child sees the end of its stdin, and exits, as soon as the parent is gone,
however it ended. A child that dies fails the call it was running and is replaced.

    pool = ProcessPool(2)
    png = await pool.run(render_png, "a fox", "", 7, 512, 512, 20, 7.5)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("imagegraph.processes")

_LENGTH = struct.Struct(">Q")
_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class ProcessLost(Exception):
    """The process running a call ended before it answered."""


class ProcessPool:
    """`size` child processes, each running one call at a time, fed from one queue. Each
    child imports the modules named in `preload` as it starts (what its calls will need),
    so that a pool started ahead of time (`start`) answers its first calls at once."""

    def __init__(self, size: int, preload: tuple[str, ...] = ()) -> None:
        if size < 1:
            raise ValueError(f"a process pool needs at least one process, not {size}")
        self.size = size
        self.preload = preload
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._feeders: list[threading.Thread] = []
        self._closed = False

    def start(self) -> None:
        """Start the children now (in the background) rather than on the first call."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this process pool was shut down")
            if not self._feeders:
                self._feeders = [
                    threading.Thread(
                        target=self._feed, name=f"imagegraph-process-{index}", daemon=True
                    )
                    for index in range(self.size)
                ]
                for feeder in self._feeders:
                    feeder.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self.start()
        self._calls.put((future, fn, args))
        return future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        """Stop taking calls; calls waiting are cancelled, running ones finish first."""
        with self._lock:
            self._closed = True
            feeders, self._feeders = self._feeders, []
        pending: list[Future[Any]] = []
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                pending.append(call[0])
        for future in pending:
            future.cancel()
        for _ in feeders:
            self._calls.put(None)
        for feeder in feeders:
            feeder.join(timeout=10)

    # -- one feeder thread per child -------------------------------------------------------

    def _feed(self) -> None:
        child = self._start_child()  # ahead of the first call
        try:
            while (call := self._calls.get()) is not None:
                future, fn, args = call
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    payload = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
                except Exception as exc:  # what cannot cross to a process
                    future.set_exception(exc)
                    continue
                if child is None or child.poll() is not None:
                    child = self._start_child()
                if child is None:
                    future.set_exception(ProcessLost("a worker process could not be started"))
                    continue
                try:
                    assert child.stdin is not None
                    assert child.stdout is not None
                    _send(child.stdin, payload)
                    ok, value = pickle.loads(_receive(child.stdout))  # noqa: S301 (our child)
                except (OSError, EOFError, pickle.UnpicklingError):
                    code = _reap(child)
                    child = None
                    future.set_exception(
                        ProcessLost(f"the worker process ended (exit code {code}) during a call")
                    )
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
        finally:
            if child is not None:
                _stop(child)

    def _start_child(self) -> subprocess.Popen[bytes] | None:
        command = [sys.executable, "-m", "imagegraph.engine.processes", *self.preload]
        try:
            child = subprocess.Popen(  # noqa: S603 (this interpreter, this module)
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError:
            log.exception("could not start a worker process (%s)", " ".join(command))
            return None
        return child


def _send(stream: IO[bytes], payload: bytes) -> None:
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> bytes:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError("the stream ended")
    (length,) = _LENGTH.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise EOFError("the stream ended inside a message")
    return payload


def _reap(child: subprocess.Popen[bytes]) -> int:
    """Wait for a child that is ending (killing it if it takes long), close its pipes;
    its exit code."""
    try:
        code = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    for stream in (child.stdin, child.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    return code


def _stop(child: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin (it exits at the end of it), then reap it."""
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    _reap(child)


_shared: dict[tuple[int, tuple[str, ...]], ProcessPool] = {}
_shared_lock = threading.Lock()


def shared_pool(size: int, preload: tuple[str, ...] = ()) -> ProcessPool:
    """The process's pool of `size` processes (one per size and preload, made once)."""
    with _shared_lock:
        pool = _shared.get((size, preload))
        if pool is None:
            pool = _shared[(size, preload)] = ProcessPool(size, preload)
        return pool


@atexit.register
def _stop_shared() -> None:
    with _shared_lock:
        pools = list(_shared.values())
    for pool in pools:
        pool.shutdown()


# -- the child -------------------------------------------------------------------------------


def _serve(calls: IO[bytes], answers: IO[bytes]) -> None:
    """Answer calls until the parent closes our stdin (or is gone)."""
    while True:
        try:
            payload = _receive(calls)
        except EOFError:
            return
        fn, args = pickle.loads(payload)  # noqa: S301 (from the parent that started us)
        try:
            answer: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:
            answer = (False, exc)
        try:
            data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an answer that cannot cross back
            data = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
        _send(answers, data)


if __name__ == "__main__":
    # The protocol owns the original stdout; anything the called code prints goes to stderr.
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    for module in sys.argv[1:]:
        importlib.import_module(module)
    _serve(sys.stdin.buffer, protocol_out)
