"""Package logger ``logging.getLogger("rankbygene")`` and its verbosity setting.

The package follows the library convention: importing it adds no handler and changes no level,
so it stays silent (beyond Python's default display of warnings) until the user configures
logging or sets :attr:`Settings.verbosity`. The ``rankbygene`` command sets the verbosity.
"""

from __future__ import annotations

import builtins
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral

#: The package's logger.
LOGGER_NAME = "rankbygene"
#: scvi-tools' logger: its INFO lines (e.g. "Generating sequential column names" at each setup,
#: "File model.pt already downloaded" at each load) show only at the package's verbosity.
SCVI_LOGGER_NAME = "scvi"
#: Lightning's advertisement lines start with this; its loggers that emit them.
LIGHTNING_TIP_PREFIX = "💡 Tip"
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
#: What scvi-tools' TrainRunner prints (to stdout, with the NameError class whatever the
#: exception) when training raises, interruptions included; the exception itself propagates.
SCVI_TRAINING_EXCEPTION_PRINT = "Exception raised during training."
#: (category, emitting module) of third-party warnings raised on import that say nothing about
#: the user's code: docrep's complaints about squidpy's docstrings, and tqdm's "IProgress not
#: found" when scvi-tools imports ``tqdm.auto`` in Jupyter without ipywidgets (the package's
#: own bars do without ipywidgets; tqdm raises no other warning on import).
QUIET_IMPORT_WARNINGS = ((SyntaxWarning, r"docrep(\.|$)"), (Warning, r"tqdm\.auto"))
#: (category, emitting module) of third-party warnings the command line and ``train()`` drop:
#: Lightning 2.6 calling an API that PyTorch deprecated.
QUIET_RUN_WARNINGS = ((FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),)


__all__ = [
    "Settings",
    "get_verbosity",
    "logger",
    "parse_verbosity",
    "quiet_lightning_tips",
    "quiet_scvi_info",
    "quiet_scvi_training_exception",
    "quiet_third_party_imports",
    "set_verbosity",
    "settings",
    "stderr_handler",
]

logger = logging.getLogger(LOGGER_NAME)

_LEVEL_NAMES = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, looked up at each record.

    Binding the stream once would keep writing to a replaced (and possibly closed) stream after
    Jupyter or pytest swap ``sys.stderr``.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Formatter(logging.Formatter):
    """``message`` for INFO and below, ``LEVEL: message`` above, as Lightning prints its lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno > logging.INFO:
            return f"{record.levelname}: {message}"
        return message


def parse_verbosity(level: int | str) -> int:
    """The :mod:`logging` level of a verbosity name or int, as :func:`set_verbosity` reads it.

    Examples
    --------
    >>> from rankbygene._logging import parse_verbosity
    >>> parse_verbosity("Info")
    20
    """
    if isinstance(level, bool):
        raise TypeError(f"verbosity must be a logging level name or int; got {level!r}.")
    if isinstance(level, Integral):
        level = int(level)
        if level < 0:
            raise ValueError(f"verbosity must be a non-negative logging level; got {level}.")
        return level
    if isinstance(level, str):
        name = level.strip().lower()
        if name in _LEVEL_NAMES:
            return _LEVEL_NAMES[name]
        raise ValueError(
            f"Unknown verbosity {level!r}: use one of {sorted(set(_LEVEL_NAMES) - {'warn'})} "
            "or a logging level int (logging.INFO, ...)."
        )
    raise TypeError(f"verbosity must be a logging level name or int; got {type(level).__name__}.")


def set_verbosity(level: int | str) -> None:
    """Set how much the ``rankbygene`` logger reports.

    Sets the level of ``logging.getLogger("rankbygene")``. When no handler would show its
    records (neither this logger nor the root logger has one), it also gets its own handler
    writing to ``sys.stderr``, which then keeps the records from reaching handlers added to the
    root logger later (so that no line shows twice). With logging already configured, records go
    to the configured handlers.

    Parameters
    ----------
    level
        A level name (``"debug"``, ``"info"``, ``"warning"``, ``"error"``, ``"critical"``, any
        case) or a :mod:`logging` level int (``logging.INFO``, ...).

    Raises
    ------
    ValueError
        Unknown level name or a negative int.
    TypeError
        Neither a string nor an int.

    Examples
    --------
    >>> import logging
    >>> import rankbygene as rbg
    >>> rbg.set_verbosity("info")
    >>> rbg.settings.verbosity == logging.INFO
    True
    >>> rbg.settings.verbosity = "warning"
    """
    value = parse_verbosity(level)
    logger.setLevel(value)
    if not logger.hasHandlers():
        logger.addHandler(stderr_handler())
        logger.propagate = False


def stderr_handler() -> logging.Handler:
    """A handler printing records to the current ``sys.stderr``, one line each.

    INFO lines are the message alone, higher levels ``LEVEL: message``.

    Examples
    --------
    >>> import logging
    >>> from rankbygene._logging import stderr_handler
    >>> isinstance(stderr_handler(), logging.Handler)
    True
    """
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    return handler


def get_verbosity() -> int:
    """The effective level of the ``rankbygene`` logger (``logging.WARNING`` by default).

    Examples
    --------
    >>> import rankbygene as rbg
    >>> rbg.get_verbosity() >= 0
    True
    """
    return logger.getEffectiveLevel()


class Settings:
    """Package settings, as ``scanpy.settings`` and ``scvi.settings``: ``rankbygene.settings``.

    ``verbosity`` is the level of the ``rankbygene`` logger: read as an int, set with a level
    name or int (see :func:`set_verbosity`).

    Examples
    --------
    >>> import rankbygene as rbg
    >>> rbg.settings.verbosity = "info"
    >>> rbg.settings.verbosity
    20
    >>> rbg.settings.verbosity = "warning"
    """

    @property
    def verbosity(self) -> int:
        """Level of the ``rankbygene`` logger; set it with a level name or int."""
        return get_verbosity()

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        set_verbosity(level)

    def __repr__(self) -> str:
        return f"Settings(verbosity={logging.getLevelName(self.verbosity)!r})"


#: The package settings (``rankbygene.settings``).
settings = Settings()


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP_PREFIX)


def quiet_lightning_tips() -> None:
    """Drop Lightning's "💡 Tip" lines (advertisements of its cloud services) from its log.

    Lightning (2.6) has no switch for them in ``Trainer`` (newer releases take
    ``suggest_integrations=False``); a logging filter on the logger that emits them is the
    logging configuration it supports. Its other lines (GPU available, epochs reached) stay.
    Idempotent.

    Examples
    --------
    >>> from rankbygene._logging import quiet_lightning_tips
    >>> quiet_lightning_tips()
    """
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        emitter = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in emitter.filters):
            emitter.addFilter(_DropTips())


def ignore_import_warnings() -> None:
    """Drop, for the whole session, third-party warnings that say nothing about the user's code.

    Importing squidpy makes docrep report ``SyntaxWarning``s about squidpy's own docstrings, and
    importing scvi-tools in Jupyter without ipywidgets makes tqdm warn "IProgress not found";
    only those (by category and emitting module) are ignored. Called on ``import rankbygene``,
    so a notebook that imports it first shows none of them.

    Examples
    --------
    >>> from rankbygene._logging import ignore_import_warnings
    >>> ignore_import_warnings()
    """
    for category, module in QUIET_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)


@contextmanager
def quiet_third_party_imports() -> Iterator[None]:
    """Import third-party modules without their known import-time warnings.

    squidpy's import makes docrep report ``SyntaxWarning``s about squidpy's own docstrings; they
    say nothing about the user's code. Only those warnings (by category and emitting module) are
    dropped, and only inside the block.

    Examples
    --------
    >>> from rankbygene._logging import quiet_third_party_imports
    >>> with quiet_third_party_imports():
    ...     import squidpy as sq
    """
    with warnings.catch_warnings():
        for category, module in QUIET_IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)
        yield


@contextmanager
def quiet_scvi_info() -> Iterator[None]:
    """Show scvi-tools' log records only at the package's verbosity, inside the block.

    scvi-tools logs INFO lines with its own handler ("Generating sequential column names" at
    each ``setup_anndata``, "File model.pt already downloaded" at each ``load``): bookkeeping
    that says nothing to a user of this package. Inside the block the ``scvi`` logger's level is
    raised to the ``rankbygene`` logger's (``WARNING`` by default), so they show with
    ``rbg.settings.verbosity = "info"`` and not otherwise; the level is restored after.

    Examples
    --------
    >>> from rankbygene._logging import quiet_scvi_info
    >>> with quiet_scvi_info():
    ...     pass
    """
    scvi_logger = logging.getLogger(SCVI_LOGGER_NAME)
    previous = scvi_logger.level
    scvi_logger.setLevel(max(previous, get_verbosity()))
    try:
        yield
    finally:
        scvi_logger.setLevel(previous)


@contextmanager
def quiet_scvi_training_exception(runner_cls: type) -> Iterator[None]:
    """Run a scvi-tools ``TrainRunner`` without its "Exception raised during training." line.

    scvi-tools (1.4) prints ``"Exception raised during training.", NameError, e`` for any
    exception in training, a Ctrl+C included, so an interrupted ``train()`` shows a NameError
    that never happened; the exception itself is re-raised and handled by the caller. Inside the
    block, ``print`` in the modules defining ``runner_cls`` and its base classes drops that line
    only and passes every other call on.

    Parameters
    ----------
    runner_cls
        The runner class (scvi-tools' ``TrainRunner`` or a subclass).

    Examples
    --------
    >>> from scvi.train import TrainRunner
    >>> from rankbygene._logging import quiet_scvi_training_exception
    >>> with quiet_scvi_training_exception(TrainRunner):
    ...     pass
    """
    missing = object()
    patched: dict[str, object] = {}
    for cls in runner_cls.__mro__:
        module = sys.modules.get(cls.__module__)
        if module is None or module is builtins or cls.__module__ in patched:
            continue
        namespace = vars(module)
        previous = namespace.get("print", missing)
        patched[cls.__module__] = previous
        # a module global shadows the builtin for the functions of that module alone
        namespace["print"] = _without_line(builtins.print if previous is missing else previous)
    try:
        yield
    finally:
        for name, previous in patched.items():
            namespace = vars(sys.modules[name])
            if previous is missing:
                namespace.pop("print", None)
            else:
                namespace["print"] = previous


def _without_line(shown: Callable[..., None]) -> Callable[..., None]:
    """``shown`` except for scvi-tools' "Exception raised during training." line."""

    def print_without_the_line(*args: object, **kwargs: object) -> None:
        if args and args[0] == SCVI_TRAINING_EXCEPTION_PRINT:
            return
        shown(*args, **kwargs)

    return print_without_the_line
