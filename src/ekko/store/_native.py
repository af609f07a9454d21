"""Low-level numba helpers shared by the store kernels: hashing and software prefetch.

Kept apart so every kernel module hashes keys the same way; ``splitmix64`` is the one hash
that decides a key's shard on every node, so it must never change.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# How many rows ahead the kernels prefetch. 16 measured best on this VM; see ENVIRONMENT.md.
PREFETCH_DISTANCE = 16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


@njit(inline="always")
def splitmix64(x: np.uint64) -> np.uint64:
    """The splitmix64 finaliser (Steele et al.): a bijective 64-bit mix."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(inline="always")
def shard_of_key(key: np.int64, num_shards: np.int64) -> np.int64:
    return np.int64(splitmix64(np.uint64(key)) % np.uint64(num_shards))


def _make_prefetch(rw: int):  # type: ignore[no-untyped-def]
    @intrinsic
    def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
        if not isinstance(arr, types.Array) or arr.ndim != 1:
            return None
        sig = types.void(arr, types.intp)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(
                context, builder, aryty, ary, [args[1]], wraparound=False, boundscheck=False
            )
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # (address, rw, locality=3: keep in every cache level, cache type=data)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(rw), i32(3), i32(1)])
            return context.get_dummy_value()

        return sig, codegen

    return _prefetch


prefetch = _make_prefetch(0)
"""``prefetch(arr, i)``: hint the CPU to load ``arr[i]`` (1-D array) for reading."""

prefetch_w = _make_prefetch(1)
"""``prefetch_w(arr, i)``: hint the CPU to load ``arr[i]`` (1-D array) for writing."""
