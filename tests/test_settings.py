"""``rankbygene.settings.verbosity``: the level of the package logger, silent unless set."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import rankbygene as rbg

LOGGER = logging.getLogger("rankbygene")


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    saved = (LOGGER.level, list(LOGGER.handlers), LOGGER.propagate, list(root.handlers))
    yield
    LOGGER.setLevel(saved[0])
    LOGGER.handlers = saved[1]
    LOGGER.propagate = saved[2]
    root.handlers = saved[3]


def test_import_configures_nothing():
    code = (
        "import logging, rankbygene as rbg\n"
        "log = logging.getLogger('rankbygene')\n"
        "print(log.level, log.handlers, log.propagate, logging.getLogger().handlers, "
        "rbg.settings.verbosity == logging.WARNING)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "0 [] True [] True"


@pytest.mark.parametrize(
    ("value", "level"),
    [("info", logging.INFO), ("DEBUG", logging.DEBUG), ("Warning", 30), (logging.ERROR, 40)],
)
def test_verbosity_accepts_names_and_ints(value, level):
    rbg.settings.verbosity = value
    assert LOGGER.level == level
    assert rbg.settings.verbosity == level
    assert rbg.get_verbosity() == level
    rbg.set_verbosity("critical")
    assert rbg.settings.verbosity == logging.CRITICAL


@pytest.mark.parametrize(
    ("value", "error"),
    [("loud", ValueError), (-1, ValueError), (True, TypeError), (None, TypeError)],
)
def test_verbosity_rejects_other_values(value, error):
    with pytest.raises(error, match="verbosity"):
        rbg.set_verbosity(value)


def test_verbosity_shows_info_once_without_logging_configured(capsys):
    logging.getLogger().handlers = []  # as in a fresh interpreter (pytest adds its own)
    LOGGER.handlers = []
    LOGGER.propagate = True
    LOGGER.info("hidden")
    rbg.settings.verbosity = "info"
    LOGGER.info("shown")
    LOGGER.warning("careful")
    rbg.settings.verbosity = "info"  # again: still one handler
    logging.basicConfig()  # configured later: no second copy through the root logger
    LOGGER.info("once")
    assert capsys.readouterr().err == "shown\nWARNING: careful\nonce\n"


def test_verbosity_uses_configured_logging(caplog):
    # pytest's handlers on the root logger stand for the user's configuration
    LOGGER.handlers = []
    LOGGER.propagate = True
    rbg.set_verbosity("info")
    assert LOGGER.handlers == []
    with caplog.at_level(logging.INFO):
        LOGGER.info("to the root")
    assert "to the root" in caplog.text


def test_importing_the_package_first_keeps_docrep_warnings_out_of_notebooks():
    # a notebook's first cell: rankbygene, then squidpy (whose import makes docrep complain)
    code = "import rankbygene\nimport squidpy\n"
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "SyntaxWarning" not in done.stderr, done.stderr[-2000:]
