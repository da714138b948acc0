"""Gradient compression for the wire, as Horovod's ``horovod/tensorflow/compression.py``.

``hvd.Compression.fp16`` sends float32/float64 values as float16: half the bytes on the wire, about 3
significant digits; they are cast back after the allreduce. ``wire`` names what :mod:`workshop_lib.comm` sends.
"""

from __future__ import annotations

import numpy as np

from . import tf
from .tf.core import Tensor, Variable, convert_to_tensor

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "Compression", "check_compression"]


class Compressor:
    """Interface: ``compress(value) -> (value, ctx)`` before the wire, ``decompress(value, ctx)`` after."""

    wire = None  # the name workshop_lib.comm uses

    @staticmethod
    def compress(tensor):
        """The value sent.

        Parameters
        ----------
        tensor : tf.Tensor or numpy.ndarray

        Returns
        -------
        tuple
            (the value sent, the context ``decompress`` needs).
        """
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        """The value received, as it was before ``compress``.

        Parameters
        ----------
        tensor : tf.Tensor or numpy.ndarray
        ctx : object
            What ``compress`` returned beside the value.

        Returns
        -------
        tf.Tensor or numpy.ndarray
        """
        return tensor


class NoneCompressor(Compressor):
    """Send values as they are."""


class FP16Compressor(Compressor):
    """Send float32/float64 values as float16 (half the bytes; about 3 significant digits), cast back after."""

    wire = "fp16"

    @staticmethod
    def compress(tensor):
        """Floating-point values as float16.

        Parameters
        ----------
        tensor : tf.Tensor or numpy.ndarray

        Returns
        -------
        tuple
            (the float16 value, or the input if it is not floating-point; the original dtype or None).
        """
        if isinstance(tensor, (Tensor, Variable)):
            t = convert_to_tensor(tensor)
            if t.dtype.is_floating and t.dtype != tf.float16:
                return tf.cast(t, tf.float16), t.dtype
            return t, None
        a = np.asarray(tensor)
        if a.dtype in (np.float32, np.float64):
            return a.astype(np.float16), a.dtype
        return a, None

    @staticmethod
    def decompress(tensor, ctx):
        """Cast back to the original dtype.

        Parameters
        ----------
        tensor : tf.Tensor or numpy.ndarray
        ctx : dtype or None
            The original dtype (None: nothing was cast).

        Returns
        -------
        tf.Tensor or numpy.ndarray
        """
        if ctx is None:
            return tensor
        if isinstance(tensor, (Tensor, Variable)):
            return tf.cast(tensor, ctx)
        return np.asarray(tensor).astype(ctx)


class Compression:
    """``Compression.none`` or ``Compression.fp16``, as in Horovod."""

    none = NoneCompressor
    fp16 = FP16Compressor


def check_compression(compression):
    """``compression`` itself, once checked to be a Compressor class.

    Parameters
    ----------
    compression : type

    Returns
    -------
    type
    """
    if not (isinstance(compression, type) and issubclass(compression, Compressor)):
        raise ValueError(f"compression={compression!r} must be hvd.Compression.none or hvd.Compression.fp16")
    return compression
