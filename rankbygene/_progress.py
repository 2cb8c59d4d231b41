"""Progress bars: on stderr, only for long work, and one line where output is not a terminal.

Every progress bar of the package comes from :func:`progress_bar`:

- in Jupyter with ipywidgets, tqdm's notebook widget;
- on a terminal (stderr is a TTY), tqdm's bar on stderr, redrawn as work goes;
- elsewhere (a file, a pipe, a CI log, Jupyter without ipywidgets), one line on stderr when
  the work ends: tqdm's redraws there are stored as dozens of frames (a notebook's saved
  output, ``2> log.txt``), and tqdm's notebook bar without ipywidgets prints "IProgress not
  found" instead.

Work that ends within :data:`PROGRESS_DELAY_S` shows no bar at all.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm as std_tqdm

#: Seconds of work before a progress bar shows: shorter work shows none.
PROGRESS_DELAY_S = 2.0


__all__ = ["FinalLineTqdm", "progress_bar"]


class FinalLineTqdm(std_tqdm):
    """A tqdm bar that writes only its final state, once, when it closes after the delay.

    Examples
    --------
    >>> import io
    >>> from rankbygene._progress import FinalLineTqdm
    >>> stream = io.StringIO()
    >>> for _ in FinalLineTqdm(range(3), file=stream, desc="work"):
    ...     pass
    >>> stream.getvalue().count("work")
    1
    """

    _closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._closing:
            return True  # counted as drawn, so that close() knows the delay has passed
        return super().display(msg, pos)

    def close(self) -> None:
        self._closing = True
        super().close()


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    ipython = getattr(shell, "get_ipython", lambda: None)() if shell is not None else None
    return ipython is not None and hasattr(ipython, "kernel")


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
    **kwargs: Any,
) -> std_tqdm:
    """A tqdm progress bar suited to where the output goes (see the module's docstring).

    Parameters
    ----------
    iterable
        What to iterate over, or ``None`` for a bar updated by hand.
    desc, total, unit, disable
        As :class:`tqdm.tqdm`.
    **kwargs
        Passed to :class:`tqdm.tqdm`.

    Returns
    -------
    The bar; it is shown only when the work lasts more than ``PROGRESS_DELAY_S`` seconds.

    Examples
    --------
    >>> from rankbygene._progress import progress_bar
    >>> sum(progress_bar(range(3), desc="adding"))
    3
    """
    kwargs.setdefault("delay", PROGRESS_DELAY_S)
    common = {"desc": desc, "total": total, "unit": unit, "disable": disable, **kwargs}
    if _in_jupyter() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(iterable, **common)
    if _stderr_is_terminal():
        return std_tqdm(iterable, file=sys.stderr, **common)
    return FinalLineTqdm(iterable, file=sys.stderr, **common)
