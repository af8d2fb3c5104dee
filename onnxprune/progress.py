"""Progress bars on stderr for long loops: targets of a prune, rounds, sensitivity sweeps.

A bar is shown only where a person watches: on an interactive stderr and not with `-q`.
Elsewhere (a pipe, a log file, a test) the same code runs against a bar that does nothing,
so callers never test whether a bar exists. Bars opened inside one another stack (a round
bar above its target bar) and vanish when done: the results are printed after them.

    with progress_bar("prune", unit="target", total=len(targets)) as bar:
        for target in targets:
            ...
            bar.advance(item=target.name)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

NAME_WIDTH = 40  # the tail of a long target name is the part that tells targets apart

_open_bars = 0  # bars currently shown: a new one goes on the line below them


class ProgressBar:
    """One bar; `advance` counts finished items, optionally naming the last one."""

    def __init__(self, bar: Any | None = None):
        self._bar = bar  # a tqdm bar, or None when nothing is shown

    @property
    def shown(self) -> bool:
        """Whether anything reaches the screen."""
        return self._bar is not None

    def advance(self, count: int = 1, item: str | None = None) -> None:
        """`count` more items done; `item` (e.g. a target name) is shown beside the bar."""
        if self._bar is None:
            return
        if item is not None:
            self._bar.set_postfix_str(item[-NAME_WIDTH:], refresh=False)
        self._bar.update(count)

    def set_total(self, total: int) -> None:
        """The number of items, once it is known (the bar then shows a fraction and an ETA)."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def callback(self) -> Callable[[Any], None]:
        """A `progress(target)` callback for `onnxprune.prune`: one step per target; the
        pipeline calls its `set_total` once it knows how many targets there are."""
        bar = self

        class Callback:
            set_total = staticmethod(bar.set_total)

            def __call__(self, target) -> None:
                bar.advance(item=getattr(target, "name", None))

        return Callback()


def shows_progress(quiet: bool = False, stream: IO[str] | None = None) -> bool:
    """Whether bars would be shown: not quiet, and the stream (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def progress_bar(label: str, *, total: int | None = None, unit: str = "target",
                 quiet: bool = False, stream: IO[str] | None = None,
                 force: bool = False, **tqdm_options: Any) -> Iterator[ProgressBar]:
    """A bar labelled `label` counting `unit`s on `stream` (stderr), for the `with` block.

    Nothing is shown with `quiet` or when the stream is not a terminal, unless `force`
    (tests, or a caller that knows better). The bar is removed from the screen at the end.
    `tqdm_options` go to tqdm as they are (`mininterval`, `smoothing`, ...).
    """
    global _open_bars
    stream = sys.stderr if stream is None else stream
    if not (force or shows_progress(quiet, stream)):
        yield ProgressBar()
        return
    from tqdm import tqdm

    position = _open_bars
    _open_bars += 1
    try:
        with tqdm(desc=label, total=total, unit=unit, file=stream, leave=False,
                  position=position, dynamic_ncols=True, **tqdm_options) as bar:
            yield ProgressBar(bar)
    finally:
        _open_bars -= 1
