"""Recursive doubling: log2(p) pairwise exchanges of the whole buffer, for latency-bound (small) messages.

At step k every rank exchanges its buffer with the rank whose number differs in bit k and both reduce, so after
log2 p steps every rank holds the reduction of all; ranks beyond a power of two fold into a neighbour first and
get the result back at the end (MPICH's way). Both partners of an exchange compute ``lower rank's value op higher
rank's value``, so every rank ends with bit-identical results.
"""

from __future__ import annotations

import numpy as np

__all__ = ["recursive_doubling"]


def recursive_doubling(c, buf, reduce, deadline):
    """log2(p) pairwise exchanges of the whole buffer; ranks beyond a power of two fold in first (MPICH's way).

    Both partners of an exchange compute ``lower rank's value op higher rank's value``, so every rank
    ends with bit-identical results.

    Parameters
    ----------
    c : Communicator
        The communicator whose ``comm``, ``wait``, ``exchange`` and ``scratch`` the algorithm uses.
    buf : numpy.ndarray
        Flat values, reduced in place.
    reduce : numpy ufunc
        Called as ``reduce(lower rank's, higher rank's, out=...)``.
    deadline : float or None
        A ``time.monotonic()`` time, or None to wait for ever.
    """
    p, r = c.size, c.rank
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    tmp = np.empty_like(buf)
    what = "recursive-doubling allreduce"
    if r < 2 * rem:
        if r % 2 == 0:  # fold into the odd neighbour, then wait for the result
            c.wait([c.comm.Isend(buf, dest=r + 1, tag=11)], deadline, what)
            new_rank = -1
        else:
            c.wait([c.comm.Irecv(tmp, source=r - 1, tag=11)], deadline, what)
            reduce(tmp, buf, out=buf)  # (r - 1) op r
            new_rank = r // 2
    else:
        new_rank = r - rem
    if new_rank >= 0:
        mask = 1
        while mask < pof2:
            partner_new = new_rank ^ mask
            partner = partner_new * 2 + 1 if partner_new < rem else partner_new + rem
            c.exchange(buf, partner, tmp, partner, deadline, what)
            if partner < r:
                reduce(tmp, buf, out=buf)
            else:
                reduce(buf, tmp, out=buf)
            mask <<= 1
    if r < 2 * rem:
        if r % 2 == 0:
            c.wait([c.comm.Irecv(buf, source=r + 1, tag=12)], deadline, what)
        else:
            c.wait([c.comm.Isend(buf, dest=r - 1, tag=12)], deadline, what)
