"""`GenerationHandle`: the caller's side of one request, fed by the engine thread.

The engine pushes text deltas and then exactly one terminal event (a result or an error), so a caller
iterating the stream or blocking on `result()` is always released, never left hanging.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from workers.inference.request import GenerationError, GenerationResult

_END = object()  # queue sentinel: the terminal event has been recorded


class GenerationHandle:
    """Stream (`for delta in handle`) and/or wait (`handle.result()`) for one request. Thread-safe.

    Only one consumer should iterate the stream; `result()` may be called by anyone, any number of times.
    """

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._deltas: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done = threading.Event()
        self._terminal = threading.Lock()  # finish/fail may race when close() gives up joining the loop
        self._cancelled = threading.Event()
        self._result: GenerationResult | None = None
        self._error: GenerationError | None = None

    # --- caller side -------------------------------------------------------------------------------------

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Yield text deltas as they are decoded; raises the engine's error, or TimeoutError per wait."""
        while True:
            try:
                item = self._deltas.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no output from request {self.request_id} for {timeout}s") from None
            if item is _END:
                self._deltas.put(_END)  # keep the stream ended for a second iteration
                self._raise_if_failed()
                return
            assert isinstance(item, str)
            yield item

    def __iter__(self) -> Iterator[str]:
        return self.stream()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; raises `GenerationError` if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout}s")
        self._raise_if_failed()
        assert self._result is not None
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (finish_reason "cancelled")."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # A fresh instance per raise: re-raising one shared exception object from several threads would
            # interleave their tracebacks.
            error = type(self._error)(*self._error.args)
            raise error from self._error.__cause__

    # --- engine side -------------------------------------------------------------------------------------

    def push(self, delta: str) -> None:
        if delta and not self._done.is_set():
            self._deltas.put(delta)

    def finish(self, result: GenerationResult) -> None:
        with self._terminal:
            if self._done.is_set():
                return
            self._result = result
            self._done.set()
            self._deltas.put(_END)

    def fail(self, error: GenerationError) -> None:
        with self._terminal:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            self._deltas.put(_END)
