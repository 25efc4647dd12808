"""One progress interface for the library: a tqdm bar, a callback, or nothing.

``progress=True`` shows tqdm (the CLI and notebooks); a callable ``f(fraction, message)``
is how the explorer drives its Panel indicator; ``False`` is silent.
"""

from __future__ import annotations

from typing import Callable, Union

ProgressArg = Union[bool, Callable[[float, str], None], None]


class Progress:
    def __init__(self, progress: ProgressArg, total: int, desc: str = ""):
        self.total = max(int(total), 1)
        self.done = 0
        self.desc = desc
        self.message = desc
        self._callback = progress if callable(progress) else None
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False)

    def set_message(self, message: str) -> None:
        self.message = message
        if self._bar is not None:
            self._bar.set_postfix_str(message[:60], refresh=False)
        if self._callback is not None:
            self._callback(self.done / self.total, message)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._callback is not None:
            self._callback(min(self.done / self.total, 1.0), self.message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
