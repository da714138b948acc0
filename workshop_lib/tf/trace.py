"""The verbose trace: with ``WORKSHOP_VERBOSE=1`` every primitive a Session runs prints one line, as
``MKLDNN_VERBOSE=1`` (``ONEDNN_VERBOSE``) does for oneDNN::

    workshop_verbose,exec,<primitive>,<kernel>,<layout>,src:<input shapes>,dst:<output shape>,<milliseconds>
    workshop_verbose,exec,reorder,<from>-><to>,<shape>,<milliseconds>

The switch is read once per ``Session.run`` (so a notebook can turn it on for one run and off again), and
it changes nothing but what is printed to stderr.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

__all__ = ["verbose", "describe", "Trace"]


def verbose():
    """Whether the trace is on: ``WORKSHOP_VERBOSE`` is set to anything but "" or "0"."""
    return os.environ.get("WORKSHOP_VERBOSE", "0") not in ("", "0")


def describe(value):
    """A value's shape as the trace writes it: ``64x14x14x32``, or ``scalar``."""
    shape = np.shape(value) if isinstance(value, np.ndarray) else ()
    return "x".join(str(d) for d in shape) or "scalar"


class Trace:
    """The trace of one run: ``start()`` before a plan entry runs, ``record(...)`` after it."""

    def __init__(self, on=None):
        self.on = verbose() if on is None else bool(on)

    def start(self):
        return time.perf_counter() if self.on else 0.0

    def record(self, entry, ctx, args, result, t0):
        """Print ``entry``'s line: its own ``trace_fields(args, result)`` if it has them, else an op's."""
        if not self.on:
            return
        ms = 1e3 * (time.perf_counter() - t0)
        if hasattr(entry, "trace_fields"):
            fields = entry.trace_fields(args, result)
        else:
            kernel = ctx.conv_algorithm if "Conv" in entry.type else ctx.gemm_algorithm if "MatMul" in entry.type \
                else "numpy"
            fields = op_fields(entry.type, kernel, entry.attrs.get("data_format", "-"), args, result)
        sys.stderr.write("workshop_verbose,exec," + ",".join(fields) + f",{ms:.3f}\n")  # one write: ranks never interleave


def op_fields(op_type, kernel, layout, args, result):
    """The fields of a primitive's line: type, kernel, layout, input shapes, output shape."""
    return [op_type, kernel, layout, "src:" + ",".join(describe(a) for a in args),
            "dst:" + describe(result[0] if result else None)]
