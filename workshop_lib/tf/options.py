"""``tf.GraphOptions``: the CPU optimizations a Session runs with, and the three variants the course compares.

``GraphOptions(kernels="stock" | "reference" | "optimized")``: the reference kernels compiled for a stock
build's CPU (sandybridge: AVX, no AVX2/FMA/AVX-512), the same kernels compiled for this CPU, and the fast
kernels with fusion. The one idea: reference / stock is what the compiler gains from your ISA, optimized /
reference what better algorithms and fusion gain, the slides' operator and graph optimizations.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["VARIANTS", "PRECISIONS", "STOCK_NUMBA_ENV", "GraphOptions", "RewriterConfig", "numba_target", "targets_stock",
           "enable_mixed_precision_graph_rewrite", "disable_mixed_precision_graph_rewrite", "compute_precision"]

VARIANTS = ("stock", "reference", "optimized")
PRECISIONS = ("fp32", "bf16")

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
    precision : {"fp32", "bf16"}
        ``"bf16"``: mixed precision (:func:`~workshop_lib.tf.passes.mixed_precision`): convolutions and matmuls
        on bf16 operands with fp32 accumulation, fp32 master weights, loss, reductions and optimizer. Also
        switched on by TensorFlow 1's ``rewrite_options.auto_mixed_precision_onednn_bfloat16 = RewriterConfig.ON``
        and ``tf.train.experimental.enable_mixed_precision_graph_rewrite(opt)``.
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

    def __init__(self, kernels="optimized", fusion=None, layout="native", precision="fp32"):
        if kernels == "default":
            raise ValueError("kernels='default' is now 'reference' (the reference kernels for this CPU); "
                             f"the variants are {VARIANTS}")
        if kernels not in VARIANTS:
            raise ValueError(f"kernels={kernels!r} must be one of {VARIANTS}")
        if fusion is not None and not isinstance(fusion, (bool, np.bool_)):
            raise TypeError(f"fusion={fusion!r} must be True, False or None (None: on for 'optimized' only)")
        if layout not in ("native", "blocked"):
            raise ValueError(f"layout={layout!r} must be 'native' or 'blocked'")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
        self.precision = precision
        self.rewrite_options = RewriterConfig()
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
        if precision != "fp32":
            self.variant = None
        self._stock = kernels == "stock"

    def __repr__(self):
        if self._stock:
            return "GraphOptions(kernels='stock')"
        extra = f", precision={self.precision!r}" if self.precision != "fp32" else ""
        return f"GraphOptions(kernels={self.kernels!r}, fusion={self.fusion}, layout={self.layout!r}{extra})"


class RewriterConfig:
    """TensorFlow 1's ``rewrite_options`` (``ConfigProto().graph_options.rewrite_options``): the one switch read here.

    ``auto_mixed_precision_onednn_bfloat16``: ``RewriterConfig.ON`` runs convolutions and matmuls in bf16
    (as ``GraphOptions(precision="bf16")``), ``OFF`` or ``DEFAULT`` leaves the graph's precision alone.
    """

    DEFAULT, ON, OFF = 0, 1, 2

    def __init__(self):
        self._amp_bf16 = RewriterConfig.DEFAULT

    @property
    def auto_mixed_precision_onednn_bfloat16(self):
        return self._amp_bf16

    @auto_mixed_precision_onednn_bfloat16.setter
    def auto_mixed_precision_onednn_bfloat16(self, value):
        if isinstance(value, bool) or value not in (RewriterConfig.DEFAULT, RewriterConfig.ON, RewriterConfig.OFF):
            raise ValueError(f"auto_mixed_precision_onednn_bfloat16={value!r} must be RewriterConfig.ON, .OFF or "
                             ".DEFAULT")
        self._amp_bf16 = value


_GRAPH_REWRITE = {"on": False}  # tf.train.experimental.enable_mixed_precision_graph_rewrite's process-wide switch


def enable_mixed_precision_graph_rewrite(opt, loss_scale="dynamic"):
    """TensorFlow 1's switch for mixed precision in every Session created afterwards; returns ``opt``.

    TensorFlow wraps ``opt`` for fp16's loss scaling; this engine's mixed precision is bf16, whose exponent
    range is fp32's, so no loss scaling is needed and ``opt`` comes back unchanged (``loss_scale`` is accepted
    and ignored). :func:`disable_mixed_precision_graph_rewrite` switches it off again.
    """
    if not hasattr(opt, "minimize"):
        raise TypeError(f"opt must be an optimizer (tf.train.AdamOptimizer(...), ...); got {type(opt).__name__}")
    _GRAPH_REWRITE["on"] = True
    return opt


def disable_mixed_precision_graph_rewrite():
    """Undo :func:`enable_mixed_precision_graph_rewrite` for Sessions run afterwards."""
    _GRAPH_REWRITE["on"] = False


def compute_precision(opts):
    """``"bf16"`` or ``"fp32"``: what a Session with GraphOptions ``opts`` runs convolutions and matmuls in."""
    switch = opts.rewrite_options.auto_mixed_precision_onednn_bfloat16
    if switch == RewriterConfig.OFF:
        return "fp32"
    on = opts.precision == "bf16" or switch == RewriterConfig.ON or _GRAPH_REWRITE["on"]
    return "bf16" if on else "fp32"
