"""The plumbing every job of an explorer session uses: progress, busy flag, errors, threads.

How the explorer's state is composed: :class:`~tensorscope.explorer.ExplorerState` (in
``state.py``) is one ``param.Parameterized`` class made of mixins, one per job (loading,
evaluation data, data-aware mode and recovery, quality preview, exports), each in its own
module. The mixins hold methods only: the parameters and the private attributes they read
and write (``_model``, ``_layers``, ``_data``, ``_lock`` ...) are declared once, in
``ExplorerState``. Every mixin derives from :class:`_Session` for the plumbing below. No
mixin module imports ``state.py``; it imports them.
"""

from __future__ import annotations

import contextlib

import ctypes
import gc
import time
import zipfile
from concurrent.futures import Future
from typing import Any, Callable

from ..errors import TensorscopeError
from .evaluator import TRACE_GUARD, _Superseded


class _Session:
    """Progress, the busy flag, error reporting and the worker threads of one session."""

    def stop(self) -> bool:
        """Ask the fine-tuning or staged compression under way to end at its next step; it keeps
        what it has done (the best weights so far; the stages completed). False when none runs."""
        if not self.stoppable:
            return False
        self._stop.set()
        self.progress_message = "stopping after the current step…"
        return True

    @contextlib.contextmanager
    def _stoppable(self):
        """A job :meth:`stop` can end: yields its stop check (a stop asked before it is forgotten)."""
        self._stop.clear()
        self.stoppable = True
        try:
            yield self._stop.is_set
        finally:
            self.stoppable = False

    def _report(self, fraction: float, message: str) -> None:
        self.param.update(progress=float(min(max(fraction, 0.0), 1.0)), progress_message=message)

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; on bad input set ``error`` (the state keeps what it had) and return None."""
        try:
            return fn()
        except _Superseded:
            return None
        except (TensorscopeError, ValueError, KeyError, TypeError, RuntimeError, OSError,
                EOFError, UnicodeDecodeError, zipfile.BadZipFile, AttributeError, IndexError) as e:
            text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            self.param.update(error=f"{what}: {text}" if text else f"{what}: {type(e).__name__}")
            return None

    def _busy(self, message: str, loading: bool = False):
        """Mark a job that shows progress (``busy``, ``progress``, ``progress_message``);
        ``loading``: it replaces what the page shows (a network, the evaluation data, the mode)."""
        state = self

        class _Ctx:
            def __enter__(self_):
                state.param.update(busy=True, progress=0.0, progress_message=message, error="",
                                   **({"loading": True} if loading else {}))

            def __exit__(self_, *exc):
                state.param.update(busy=False, progress=1.0 if exc[0] is None else state.progress,
                                   **({"loading": False} if loading else {}))

        return _Ctx()

    def _latest(self, key: str, fn: Callable[[], Any], delay: float = 0.0) -> None:
        """Run ``fn`` for the newest settings, once per burst (a slider dragged).

        At most one run per ``key`` is in flight; calls made meanwhile fold into one more run
        after it, which reads the settings as they are then. With an executor the run waits
        ``delay`` seconds first (debounce: a drag's first tick does not start a plan of its
        own) and happens off the caller's thread; without one it runs now.
        """
        with self._lock:
            run = self._runs.setdefault(key, {"running": False, "again": False})
            if run["running"]:
                run["again"] = True
                return
            run["running"] = True

        def loop():
            while True:
                try:
                    if delay and self.executor is not None:
                        time.sleep(delay)
                    with TRACE_GUARD.running():
                        fn()
                except BaseException:
                    with self._lock:
                        run["running"] = run["again"] = False
                    raise
                with self._lock:
                    if not run["again"]:
                        run["running"] = False
                        return
                    run["again"] = False

        if self.executor is None:
            loop()
        else:
            self.executor.submit(loop)

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the executor (or now, without one); errors land in ``error``."""

        def call():
            try:
                with TRACE_GUARD.running():
                    return fn(*args, **kwargs)
            except TensorscopeError as e:
                self.error = str(e)
                raise
            except Exception as e:  # never fail silently in a worker thread: the page must say
                self.error = f"{getattr(fn, '__name__', 'work')} failed: {type(e).__name__}: {e}"
                raise

        if self.executor is None:
            fut: Future = Future()
            try:
                fut.set_result(call())
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                fut.set_exception(e)
            return fut
        return self.executor.submit(call)


def _release_memory() -> None:
    """Hand memory freed by a closed session back to the OS.

    glibc keeps freed blocks in per-thread arenas (the worker threads each have one), so a
    server's resident size stays at its high-water mark after sessions close unless asked:
    measured +12.9% after 50 sessions without this, 35-40 MB returned by each trim.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass
