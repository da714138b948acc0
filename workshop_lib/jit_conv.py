"""Direct convolution with register-blocked SIMD micro-kernels (fp32), the way oneDNN's jit kernels work.

No im2col: each micro-kernel keeps a tile of outputs in vector registers and streams the input and the
weights past it (numba ``@intrinsic`` builds the LLVM vector code, as :mod:`workshop_lib.int8` does for
``vpdpbusd``). :mod:`workshop_lib.kernels` calls these where the shape and the CPU fit and keeps its
reference and im2col paths beside them.
"""

# ----------------------------------------------------------------------------------------------
# Forward and backward-data


# ----------------------------------------------------------------------------------------------
# Backward-weights
