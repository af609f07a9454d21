"""Message builders and comparisons for the net tests.

Messages are built from msgspec's type info rather than by hand, so the tests keep covering
every field when ``ekko.protocol.messages`` grows.
"""

from __future__ import annotations

import socket
import threading
import typing
from typing import Any

import msgspec
import msgspec.inspect as mi
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ekko.protocol.messages import Chunk, Message

WIRE_DTYPES = [
    "int64",
    "int32",
    "uint8",
    "uint16",
    "uint32",
    "float32",
    "float16",
    "int8",
    "float64",
]


def message_classes() -> list[type]:
    return list(typing.get_args(Message))


def _sample(t: mi.Type, name: str, i: int, rows: int, dim: int) -> Any:
    if isinstance(t, mi.IntType):
        return 1000 + i
    if isinstance(t, mi.StrType):
        return f"{name}-{i}-é"
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.BytesType):
        return bytes(range(i % 7, i % 7 + 8))
    if isinstance(t, mi.FloatType):
        return 0.5 + i
    if isinstance(t, mi.NoneType):
        return None
    if isinstance(t, mi.ListType):
        return [_sample(t.item_type, name, i + k, rows, dim) for k in range(2)]
    if isinstance(t, mi.DictType):
        return {
            _sample(t.key_type, name, i + k, rows, dim): _sample(
                t.value_type, "values", i + k, rows, dim
            )
            for k in range(2)
        }
    if isinstance(t, mi.UnionType):  # prefer the richest member (e.g. a list over None)
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _sample(members[0], name, i, rows, dim)
    if isinstance(t, mi.StructType):
        return t.cls(
            **{f.name: _sample(f.type, f.name, i + k, rows, dim) for k, f in enumerate(t.fields)}
        )
    if isinstance(t, mi.CustomType) and t.cls is np.ndarray:
        if name == "values":
            return (np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) / 7) - i
        return np.arange(rows, dtype=np.int64) * 3 + i
    raise NotImplementedError(f"no sample for {t!r}")


def sample_message(cls: type, *, i: int = 0, rows: int = 5, dim: int = 4) -> Any:
    """An instance of ``cls`` with every field set (optional ones too)."""
    return _sample(mi.type_info(cls), cls.__name__, i, rows, dim)


def sample_chunk(*, rows: int = 5, dim: int = 4, i: int = 0) -> Chunk:
    return _sample(mi.type_info(Chunk), "Chunk", i, rows, dim)


def every_message() -> list[Any]:
    return [sample_message(cls, i=k) for k, cls in enumerate(message_classes())]


def assert_same(a: Any, b: Any, path: str = "$") -> None:
    """Deep equality with numpy arrays compared by dtype, shape and bytes."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert np.ascontiguousarray(a).tobytes() == b.tobytes(), f"{path}: values differ"
    elif isinstance(a, msgspec.Struct):
        assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
        for f in a.__struct_fields__:
            assert_same(getattr(a, f), getattr(b, f), f"{path}.{f}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{k}]")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


_arrays = st.sampled_from(WIRE_DTYPES).flatmap(
    lambda dt: hnp.arrays(
        dtype=np.dtype(dt), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)
    )
)


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    """A hypothesis strategy for any msgspec type used by the messages."""
    if isinstance(t, mi.IntType):  # within the field's declared bounds (msgspec.Meta)
        lo = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else -(2**63)
        hi = t.le if t.le is not None else t.lt - 1 if t.lt is not None else 2**63 - 1
        return st.integers(lo, hi)
    if isinstance(t, mi.StrType):
        return st.text(max_size=20)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=40)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType):
        return st.lists(strategy_for(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(strategy_for(t.key_type), strategy_for(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of([strategy_for(m) for m in t.types])
    if isinstance(t, mi.StructType):
        return st.builds(t.cls, **{f.name: strategy_for(f.type) for f in t.fields})
    if isinstance(t, mi.CustomType) and t.cls is np.ndarray:
        return _arrays
    raise NotImplementedError(f"no strategy for {t!r}")


def messages_strategy(union: Any = Message) -> st.SearchStrategy[Any]:
    return strategy_for(mi.type_info(union))


def flood_idle_connections(
    port: int, sockets: int, stop: threading.Event, opened: list[int]
) -> None:
    """Keep ``sockets`` idle connections open to ``port``, reopening each as soon as it is
    dropped; they never answer the challenge (an attacker without the secret)."""
    live: list[socket.socket] = []
    try:
        while not stop.is_set():
            while len(live) < sockets:
                s = socket.create_connection(("127.0.0.1", port))
                s.setblocking(False)
                live.append(s)
                opened[0] += 1
            for s in list(live):
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    s.close()
                    live.remove(s)
            stop.wait(0.001)
    finally:
        for s in live:
            s.close()
