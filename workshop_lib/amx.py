"""AMX (Advanced Matrix Extensions, Sapphire Rapids and later): DL Boost's third generation, as tiles.

Eight tile registers tmm0..tmm7 of up to 16 rows x 64 bytes. ``ldtilecfg`` loads a 64-byte configuration
(palette 1: each tile's rows and bytes per row), ``tileloadd`` fills a tile from memory with a stride,
``tdpbusd``/``tdpbf16ps`` multiply two tiles into a third, ``tilestored`` writes a tile back and
``tilerelease`` frees the state. One ``tdpbusd`` is a (16 x 64) u8 tile times a (16 x 64) s8 tile read as
(64 x 16) in groups of 4: 16 x 16 x 64 = 16,384 multiply-adds, 16 x 16 vpdpbusd's worth. Linux hands a
process the tile state only after it asks: ``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``.
"""

from __future__ import annotations

import functools

from .bf16 import compile_target_features


@functools.lru_cache(maxsize=None)
def _status(feature):
    from .sysinfo import _request_tile_permission

    missing = [f for f in ("amx-tile", feature) if f not in compile_target_features()]
    if missing:
        return False, (f"numba's compile target has no {' or '.join(missing)} (this CPU has no AMX, or "
                       "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES hide it)")
    refused = _request_tile_permission()
    if refused:
        return False, refused
    return True, f"amx-tile and {feature}, and Linux granted this process the tile state"


def amx_int8_status():
    """``(usable, reason)`` for AMX-INT8 (``tdpbusd``) in this process; asks Linux for the tile state once."""
    return _status("amx-int8")


def amx_bf16_status():
    """``(usable, reason)`` for AMX-BF16 (``tdpbf16ps``) in this process; asks Linux for the tile state once."""
    return _status("amx-bf16")
