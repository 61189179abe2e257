"""Progress bars for long work (persist, verify), on stderr, only where a person watches.

``byte_progress(desc)`` is a context manager yielding a ``(done_bytes, total_bytes)``
callback — the shape ``ckpt.format`` reports progress in — that drives a tqdm bar
when stderr is a terminal and does nothing otherwise (logs and CI stay clean).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

ProgressFn = Callable[[int, int], None]


def progress_shown() -> bool:
    """Whether ``byte_progress`` draws a bar (stderr is a terminal): callers skip work
    done only to feed a bar (polling a daemon) when it is not."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def byte_progress(desc: str, enabled: bool = True) -> Iterator[ProgressFn]:
    if not enabled or not progress_shown():
        yield lambda done, total: None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
