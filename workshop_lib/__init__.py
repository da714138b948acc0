"""Deep Learning at Scale: the workshop's support library.

One module per concept: ``data`` (MNIST, photographs), ``sysinfo`` (CPU
features, threads, MPI), ``kernels`` (float32 CNN primitives), ``int8``
(VNNI-exact integer GEMM), ``quantization``, ``tf`` (a TF1-compatible graph
engine), ``models`` (the labs' CNN), ``bench``, ``comm`` (ring allreduce and
other collectives on MPI), ``hvd`` (Horovod's TensorFlow-1 API), ``d4p``
(daal4py-style distributed K-Means), ``course`` (labs from solutions).

Nothing is compiled, started or initialised here, with one deliberate
exception: two thread-runtime settings get defaults unless you set them
yourself. Both say how long an idle worker thread spins before it sleeps, the
knob Intel's guides for TensorFlow call ``KMP_BLOCKTIME``:

- ``OMP_WAIT_POLICY=PASSIVE``: numba's OpenMP threads otherwise spin after
  every parallel loop and take the cores away from BLAS's threads (on 2 cores
  that halved the training speed of the labs' CNN);
- ``OPENBLAS_THREAD_TIMEOUT=4`` (2**4 cycles): OpenBLAS's threads otherwise
  spin for about 2**28 cycles after every GEMM and slow the numba kernels that
  follow (about 15% of a training step here).

They change timing only, never results. Each runtime reads its variable when it
loads, so they work only if this package is imported before numba's OpenMP
layer and numpy's OpenBLAS are loaded; ``make lab`` and ``make test`` export
them for the notebooks.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
