"""Deep Learning at Scale: the workshop's support library.

One module per concept: ``data`` (MNIST, photographs), ``sysinfo`` (CPU
features, threads, MPI), ``kernels`` (float32 CNN primitives), ``jit_conv`` (their
register-blocked SIMD convolutions), ``int8``
(VNNI-exact integer GEMM), ``quantization``, ``tf`` (a TF1-compatible graph
engine), ``models`` (the labs' CNN), ``bench``, ``comm`` (ring allreduce and
other collectives on MPI), ``hvd`` (Horovod's TensorFlow-1 API), ``d4p``
(daal4py-style distributed K-Means), ``placement`` (cores and threads per
rank), ``timeline`` and ``scaling`` (where a step's time goes, and at scale),
``launch`` (mpiexec/srun lines), ``board`` (the class results board),
``figures`` (the labs' drawings), ``course`` (labs from solutions).

Nothing is compiled, started or initialised here, and no environment
variable is set: how many threads and which cores each rank uses is decided
by ``hvd.init()``, ``d4p.daalinit()`` or a ``comm.Communicator`` (see
``placement``).
"""

__version__ = "0.1.0"
