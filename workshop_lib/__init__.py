"""Deep Learning at Scale: the workshop's support library.

One module per concept: ``data`` (MNIST, photographs), ``sysinfo`` (CPU
features, threads, MPI), ``course`` (labs from solutions), ``d4p``
(daal4py-style distributed K-Means), ``comm`` (collectives on mpi4py).
Nothing is imported, compiled or initialised here: import what you use.
"""

__version__ = "0.1.0"
