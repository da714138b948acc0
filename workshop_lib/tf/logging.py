"""``tf.logging``: TensorFlow 1's logging functions, printing ``INFO:tensorflow:...`` lines to stderr."""

from __future__ import annotations

import logging as _logging
import sys

DEBUG, INFO, WARN, ERROR, FATAL = _logging.DEBUG, _logging.INFO, _logging.WARNING, _logging.ERROR, _logging.CRITICAL

_logger = _logging.getLogger("workshop_lib.tf")
_logger.propagate = False
_logger.setLevel(WARN)


class _Handler(_logging.Handler):
    """Writes to the *current* sys.stderr, so notebooks and pytest's capture see the lines."""

    def emit(self, record):
        try:
            name = {WARN: "WARNING", FATAL: "FATAL"}.get(record.levelno, record.levelname)
            sys.stderr.write(f"{name}:tensorflow:{record.getMessage()}\n")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


if not _logger.handlers:
    _logger.addHandler(_Handler())


def set_verbosity(level):
    _logger.setLevel(level)


def get_verbosity():
    return _logger.level


def debug(msg, *args):
    _logger.debug(msg, *args)


def info(msg, *args):
    _logger.info(msg, *args)


def warning(msg, *args):
    _logger.warning(msg, *args)


warn = warning


def error(msg, *args):
    _logger.error(msg, *args)


def fatal(msg, *args):
    _logger.critical(msg, *args)
