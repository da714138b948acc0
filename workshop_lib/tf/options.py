"""``tf.GraphOptions``: the CPU optimizations a Session runs with, and the three variants the course compares.

``GraphOptions(kernels="stock" | "reference" | "optimized")``: the reference kernels compiled for a stock
build's CPU (sandybridge: AVX, no AVX2/FMA/AVX-512), the same kernels compiled for this CPU, and the fast
kernels with fusion. The one idea: reference / stock is what the compiler gains from your ISA, optimized /
reference what better algorithms and fusion gain, the slides' operator and graph optimizations.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["VARIANTS", "STOCK_NUMBA_ENV", "GraphOptions", "numba_target", "targets_stock"]

VARIANTS = ("stock", "reference", "optimized")

# What the slides' "default" was: stock TensorFlow wheels, built for AVX but without AVX2, FMA or AVX-512.
# numba reads its target from these variables once, when it is imported, so the stock variant runs in a
# Python started with them (``bench.measure_cnn("stock")`` starts one).
STOCK_NUMBA_ENV = {
    "NUMBA_CPU_NAME": "sandybridge",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+cmov,+crc32,+cx16,+cx8,+fxsr,+mmx,+pclmul,+popcnt,+sahf,+sse,+sse2,+sse3,"
                          "+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt,-avx2,-fma,-f16c,-bmi,-bmi2,-avx512f",
}


def numba_target():
    """(CPU name, feature string) numba compiles for in this process: the host's unless ``NUMBA_CPU_*`` were set."""
    import llvmlite.binding as ll

    name = numba.config.CPU_NAME or ll.get_host_cpu_name()
    features = numba.config.CPU_FEATURES
    return name, features if features is not None else ll.get_host_cpu_features().flatten()


def targets_stock():
    """Whether this process's numba compiles for the stock target (:data:`STOCK_NUMBA_ENV` set before its import)."""
    return (numba.config.CPU_NAME, numba.config.CPU_FEATURES) == tuple(STOCK_NUMBA_ENV.values())


class GraphOptions:
    """The CPU optimizations of this course; the three variants are ``GraphOptions(kernels=NAME)``.

    Parameters
    ----------
    kernels : {"optimized", "reference", "stock"}
        ``"optimized"``: the fast kernels (:mod:`~workshop_lib.jit_conv`'s direct convolutions, im2col + BLAS
        where they do not fit, BLAS matmul), fusion on (forward conv/matmul + bias + ReLU, and the backward
        pooling + ReLU + bias gradients, :func:`~workshop_lib.tf.passes.fuse_gradients`).
        ``"reference"``: the reference kernels (direct loops, the textbook GEMM) compiled for this CPU, fusion off.
        ``"stock"``: the same reference kernels compiled for a ``sandybridge`` target (AVX, no AVX2, FMA or
        AVX-512), no fusion, no layout propagation: what a stock TensorFlow wheel of the slides' time ran. numba
        picks its target per process, so this needs a Python started with :data:`STOCK_NUMBA_ENV`; in any other
        process it raises ``ValueError`` saying so. ``reference`` against ``stock`` is what the compiler gained
        from your ISA; ``optimized`` against ``reference`` is better algorithms and fusion.
    fusion : bool, optional
        Fuse Conv2D/MatMul + BiasAdd (+ Relu) into one primitive; default on for ``"optimized"`` only.
    layout : {"native", "blocked"}
        ``"native"`` (every op in the graph's layout) or ``"blocked"`` (layout propagation: convolutions with
        16 or more input channels, and the pooling and ReLU after them, run in nChw16c; values stay blocked
        from op to op and are reordered only where a plain-layout op needs them; counted in Session.stats).
        It applies where no gradient needs the ops' workspaces, i.e. to inference. See :mod:`.passes`.

    Attributes
    ----------
    variant : str or None
        ``"stock"``, ``"reference"`` or ``"optimized"`` when the options are exactly one of the three, else None.
    kernels : str
        The kernels' code, ``"optimized"`` or ``"reference"`` (``"stock"`` runs the reference code).
    """

    def __init__(self, kernels="optimized", fusion=None, layout="native"):
        if kernels == "default":
            raise ValueError("kernels='default' is now 'reference' (the reference kernels for this CPU); "
                             f"the variants are {VARIANTS}")
        if kernels not in VARIANTS:
            raise ValueError(f"kernels={kernels!r} must be one of {VARIANTS}")
        if fusion is not None and not isinstance(fusion, (bool, np.bool_)):
            raise TypeError(f"fusion={fusion!r} must be True, False or None (None: on for 'optimized' only)")
        if layout not in ("native", "blocked"):
            raise ValueError(f"layout={layout!r} must be 'native' or 'blocked'")
        if kernels == "stock":
            if fusion or layout != "native":
                raise ValueError(f"kernels='stock' has no fusion and no layout propagation; got fusion={fusion!r}, "
                                 f"layout={layout!r}")
            if not targets_stock():
                name, features = numba_target()
                isa = ", ".join(f for f in ("avx2", "fma", "avx512f") if f"+{f}" in features) or "no AVX2/FMA/AVX-512"
                setting = " ".join(f"{k}={v!r}" for k, v in STOCK_NUMBA_ENV.items())
                raise ValueError(
                    f"kernels='stock' needs numba compiling for sandybridge (AVX, no AVX2/FMA/AVX-512), but this "
                    f"process's numba targets {name} ({isa}); numba reads NUMBA_CPU_NAME and NUMBA_CPU_FEATURES once, "
                    f"at its import: start a new Python with {setting} "
                    "(bench.measure_cnn('stock') starts one for you)")
        self.fusion = kernels == "optimized" if fusion is None else bool(fusion)
        self.layout = layout
        self.kernels = "optimized" if kernels == "optimized" else "reference"
        defaults = {"stock": ("reference", False, "native"), "reference": ("reference", False, "native"),
                    "optimized": ("optimized", True, "native")}
        self.variant = kernels if (self.kernels, self.fusion, self.layout) == defaults[kernels] else None
        self._stock = kernels == "stock"

    def __repr__(self):
        if self._stock:
            return "GraphOptions(kernels='stock')"
        return f"GraphOptions(kernels={self.kernels!r}, fusion={self.fusion}, layout={self.layout!r})"
