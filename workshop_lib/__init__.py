"""Deep Learning at Scale: the workshop's support library.

One module per concept: ``data`` (MNIST, photographs), ``sysinfo`` (CPU
features, threads, MPI), ``kernels`` (float32 CNN primitives), ``int8``
(VNNI-exact integer GEMM), ``quantization``, ``tf`` (a TF1-compatible graph
engine), ``models`` (the labs' CNN), ``bench``, ``d4p`` (daal4py-style
distributed K-Means), ``course`` (labs from solutions).

Nothing is compiled, started or initialised here, with one deliberate
exception: unless you set it yourself, ``OMP_WAIT_POLICY`` defaults to
``PASSIVE``. numba's OpenMP threads otherwise spin after every parallel loop
and take the cores away from BLAS's threads: on 2 cores that halved the
training speed of the labs' CNN. It changes timing only, never results, and
must be set before numba loads its OpenMP runtime, hence here.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
