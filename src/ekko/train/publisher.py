"""Turn optimizer steps into store writes: a delta tracker for any torch model.

Follows TorchRec's ``model_delta_tracker``: forward hooks on every embedding module record
the ids looked up in a step; ``publish()`` (called after ``optimizer.step()``) compacts them
to unique rows and writes exactly those rows' new values to a ``Sink``. Dense tensors
(everything else in the state dict) are one-key tables, written when changed, at most every
``dense_interval_s`` seconds, and always on ``flush()``.

A ``DynamicEmbedding`` is one table keyed by raw ids: the hook records the row slots it
looked up and ``publish()`` writes them under the ids holding them, after handing the ids it
evicted since the last publish to ``Sink.delete`` (a sink without ``delete`` is refused at
construction when a table evicts). Its default row is never written.

Assumption: the optimizer moves only rows that had a gradient in the step (SparseAdam,
sparse Adagrad, SGD without momentum on sparse gradients). A dense-gradient optimizer with
momentum keeps moving rows after their last lookup; those moves would not be published.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ekko.store.spec import Sink, TableSpec
from ekko.train.dynamic_embedding import DynamicEmbedding

EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class PublisherConfig:
    """How the publisher names, shards and paces tables.

    ``table_names`` maps a module's qualified name to its store table name; embedding
    modules it does not list are named by their qualified name. Dense tables are named
    ``dense_prefix + state_dict key``.
    """

    table_names: Mapping[str, str] = field(default_factory=dict)
    embedding_shards: int = 16
    dense_shards: int = 1
    dense_interval_s: float = 1.0
    dense_prefix: str = "dense/"

    def __post_init__(self) -> None:
        if self.embedding_shards <= 0:
            raise ValueError(
                f"PublisherConfig.embedding_shards must be > 0: {self.embedding_shards}"
            )
        if self.dense_shards <= 0:
            raise ValueError(f"PublisherConfig.dense_shards must be > 0: {self.dense_shards}")
        if self.dense_interval_s < 0:
            raise ValueError(
                f"PublisherConfig.dense_interval_s must be >= 0: {self.dense_interval_s}"
            )


@dataclass(frozen=True)
class PublisherStatistics:
    """Counters since construction; times are process CPU-side wall time in seconds.

    ``rows_deleted`` counts the evicted ids of dynamic tables handed to ``Sink.delete``.
    ``record_time_s`` is spent in the forward hooks, ``publish_time_s`` in ``publish``,
    ``flush`` and ``snapshot`` (compaction, gather, sink writes).
    """

    publishes: int
    rows_published: int
    rows_deleted: int
    dense_tensors_published: int
    bytes_published: int
    record_time_s: float
    publish_time_s: float


class _EmbeddingTable:
    """One tracked embedding module and the ids it looked up since the last publish.

    For a ``DynamicEmbedding`` the tracked module is its row parameter's ``nn.Embedding``:
    the ids recorded are row slots, which ``rows`` maps back to raw ids."""

    def __init__(
        self,
        name: str,
        module: nn.Embedding | nn.EmbeddingBag,
        dynamic: DynamicEmbedding | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.dynamic = dynamic
        self.pending: list[torch.Tensor] = []

    def take_unique(self) -> torch.Tensor:
        ids = torch.unique(torch.cat(self.pending)) if self.pending else torch.empty(0)
        self.pending = []
        pad = self.module.padding_idx
        if pad is not None and ids.numel():
            ids = ids[ids != pad]
        return ids.to(torch.int64)

    def rows(self, everything: bool) -> tuple[np.ndarray, torch.Tensor]:
        """(store keys, row indices into the weight) to publish."""
        if self.dynamic is not None:
            if everything:
                self.pending = []
                keys, slots = self.dynamic.live()
            else:
                keys, slots = self.dynamic.keys_of(self.take_unique().numpy())
            return keys, torch.from_numpy(slots)
        if everything:
            self.pending = []
            ids = torch.arange(self.module.num_embeddings, dtype=torch.int64)
        else:
            ids = self.take_unique()
        return ids.numpy(), ids


class EmbeddingPublisher:
    """Publishes the rows an optimizer step changed, for any torch model.

    Why: online training touches a few rows per step; shipping only those rows (and dense
    tensors at a bounded rate) is what keeps replicas seconds behind the trainer.

    Use::

        pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=...))
        loss = loss_fn(model(x), y); loss.backward(); opt.step()
        pub.publish()
        ...
        pub.flush()

    Ids are recorded by forward hooks only while autograd is enabled and the table's weight
    requires grad (a ``no_grad`` prediction changes nothing), and only when the lookup
    succeeded (a forward hook runs after the module, so out-of-range ids, which torch
    rejects, are never recorded). ``padding_idx`` rows never change and are not written.

    Args:
        model: any module; its ``nn.Embedding`` / ``nn.EmbeddingBag`` submodules are tables.
        sink: receiver of the rows.
        config: naming, shards, dense pacing.
        clock: monotonic seconds, for the dense interval (inject a fake one in tests).
    """

    def __init__(
        self,
        model: nn.Module,
        sink: Sink,
        config: PublisherConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or PublisherConfig()
        self.sink = sink
        self._clock = clock
        self._tables = self._find_tables(model)
        self._check_deletes()
        weight_keys = {
            f"{qual}.weight" if qual else "weight"
            for qual, m in model.named_modules()
            if isinstance(m, EMBEDDING_TYPES)
        }
        self._dense = {
            f"{self.config.dense_prefix}{key}": t
            for key, t in model.state_dict(keep_vars=True).items()
            if key not in weight_keys and t.is_floating_point()
        }
        self._dense_seen: dict[str, tuple[int, int]] = {}
        self._last_dense: float | None = None
        self._created = False
        self._handles = [
            table.module.register_forward_hook(self._recorder(table), with_kwargs=True)
            for table in self._tables
        ]
        self._publishes = 0
        self._rows = 0
        self._deleted = 0
        self._dense_published = 0
        self._bytes = 0
        self._record_s = 0.0
        self._publish_s = 0.0

    def _find_tables(self, model: nn.Module) -> list[_EmbeddingTable]:
        modules = dict(model.named_modules())
        dynamic = {q: m for q, m in modules.items() if isinstance(m, DynamicEmbedding)}
        for qual in self.config.table_names:
            if not isinstance(modules.get(qual), (*EMBEDDING_TYPES, DynamicEmbedding)):
                raise ValueError(
                    f"PublisherConfig.table_names: {qual!r} is not an nn.Embedding, "
                    f"nn.EmbeddingBag or DynamicEmbedding of the model"
                )
        inner = {f"{q}.embedding" if q else "embedding": q for q in dynamic}
        tables = []
        for qual, m in modules.items():
            if qual in inner:
                dyn = dynamic[inner[qual]]
                name = self.config.table_names.get(inner[qual], inner[qual] or "embedding")
                tables.append(_EmbeddingTable(name, m, dyn))
            elif isinstance(m, EMBEDDING_TYPES):
                tables.append(
                    _EmbeddingTable(self.config.table_names.get(qual, qual or "embedding"), m)
                )
        names = [t.name for t in tables]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"PublisherConfig.table_names: duplicate table names {dupes}")
        return tables

    def _check_deletes(self) -> None:
        evicting = [t.name for t in self._tables if t.dynamic and t.dynamic.config.eviction.evicts]
        if evicting and not callable(getattr(self.sink, "delete", None)):
            raise TypeError(
                f"tables {evicting} evict rows, and their evictions are deletes in the store, "
                f"but the sink {type(self.sink).__name__} has no delete(table, keys) method: "
                f'give a sink with delete, or set eviction kind = "none" without ttl_s'
            )
        for t in self._tables:
            if t.dynamic is not None and t.dynamic.config.eviction.evicts:
                t.dynamic.track_evictions()

    def _recorder(self, table: _EmbeddingTable) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and table.module.weight.requires_grad):
                return
            start = time.perf_counter()
            ids = args[0] if args else kwargs["input"]
            table.pending.append(ids.detach().reshape(-1))
            self._record_s += time.perf_counter() - start

        return hook

    @property
    def table_names(self) -> list[str]:
        """Embedding table names, in module order."""
        return [t.name for t in self._tables]

    @property
    def dense_table_names(self) -> list[str]:
        """Dense table names, in state-dict order."""
        return list(self._dense)

    def _create_tables(self) -> None:
        if self._created:
            return
        for t in self._tables:
            dim = t.module.embedding_dim
            self.sink.create_table(TableSpec(t.name, dim, self.config.embedding_shards))
        for name, tensor in self._dense.items():
            self.sink.create_table(TableSpec(name, tensor.numel(), self.config.dense_shards))
        self._created = True

    def _write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        self.sink.write(table, keys, values)
        self._bytes += keys.nbytes + values.nbytes

    @torch.no_grad()
    def _publish_embeddings(self, everything: bool) -> None:
        # every table's deletes before any write: an id evicted and admitted again is then
        # written after, and under a memory budget shared by the tables (a table's lookups
        # evict rows of others) the store never holds one table's new rows beside the rows
        # they replaced in another (a node's max_memory_mb would refuse them)
        for t in self._tables:
            if t.dynamic is not None:
                gone = np.unique(t.dynamic.take_evicted())
                if gone.size:
                    self.sink.delete(t.name, gone)  # type: ignore[attr-defined]
                    self._deleted += int(gone.size)
        for t in self._tables:
            keys, idx = t.rows(everything)
            if keys.size == 0:
                continue
            values = t.module.weight.detach().index_select(0, idx)
            self._write(t.name, keys, values.to(torch.float32).numpy())
            self._rows += int(keys.size)

    @torch.no_grad()
    def _publish_dense(self, everything: bool) -> None:
        key0 = np.zeros(1, dtype=np.int64)
        for name, tensor in self._dense.items():
            seen = (id(tensor), tensor._version)
            if not everything and self._dense_seen.get(name) == seen:
                continue
            row = tensor.detach().to(torch.float32).reshape(1, -1).clone().numpy()
            self._write(name, key0, row)
            self._dense_seen[name] = seen
            self._dense_published += 1
        self._last_dense = self._clock()

    def publish(self) -> None:
        """Write the rows looked up since the last publish, and dense tensors if due."""
        start = time.perf_counter()
        self._create_tables()
        self._publish_embeddings(everything=False)
        now = self._clock()
        if self._last_dense is None or now - self._last_dense >= self.config.dense_interval_s:
            self._publish_dense(everything=False)
        self._publishes += 1
        self._publish_s += time.perf_counter() - start

    def discard(self) -> None:
        """Forget the ids looked up since the last publish: the step that looked them up was
        undone, so those rows hold the values already published."""
        for t in self._tables:
            t.pending = []

    def flush(self) -> None:
        """Write pending rows and every changed dense tensor now, whatever the interval."""
        start = time.perf_counter()
        self._create_tables()
        self._publish_embeddings(everything=False)
        self._publish_dense(everything=False)
        self._publishes += 1
        self._publish_s += time.perf_counter() - start

    def snapshot(self) -> None:
        """Write every row of every table and every dense tensor: the bootstrap of a store
        that must answer lookups of rows training has not touched yet."""
        start = time.perf_counter()
        self._create_tables()
        self._publish_embeddings(everything=True)
        self._publish_dense(everything=True)
        self._publish_s += time.perf_counter() - start

    def forget_rows(self, table: str, keys: np.ndarray) -> int:
        """A dynamic table ``table`` gives up the rows of ``keys``, deleted from the store
        (a rollback's ids created since its healthy point), so they free rows for the
        restored ones; returns how many it held. Other tables keep theirs (a hashed table's
        row is loaded with what the store reads instead)."""
        for t in self._tables:
            if t.name == table and t.dynamic is not None:
                return t.dynamic.forget(keys)
        return 0

    @torch.no_grad()
    def load_rows(
        self, table: str, keys: np.ndarray, values: np.ndarray, gone: np.ndarray | None = None
    ) -> int:
        """The inverse of publishing: set rows of ``table`` in the model to values the store
        holds (a rollback's restored rows, a restarted source's whole store). Pending ids are
        dropped, and a loaded dense tensor counts as published (the store holds it).

        Keys outside the embedding table (written by hand: the model hashes every id into
        it, so it never reads them) are skipped; returns how many. A dynamic table gives
        each key a row (they were admitted when written) while its budget has free rows
        and skips the rest, and none to ``gone`` keys (deleted from the store: see
        ``forget_rows``). Rows of the wrong width
        (the model's shape changed since they were written) raise ``ValueError``."""
        for t in self._tables:
            t.pending = []
        keys = np.asarray(keys, np.int64)
        values = np.asarray(values, np.float32)
        for t in self._tables:
            if t.name == table and t.dynamic is not None:
                if gone is not None and len(gone):
                    keep = ~np.isin(keys, gone)
                    keys, values = keys[keep], values[keep]
                return t.dynamic.load(keys, values)
            if t.name == table:
                weight = t.module.weight
                if values.shape != (len(keys), weight.shape[1]):
                    raise ValueError(
                        f"table {table!r}: rows of shape {values.shape} for {len(keys)} keys; "
                        f"the model's rows have width {weight.shape[1]} (its shape differs "
                        f"from the model that wrote them)"
                    )
                inside = (keys >= 0) & (keys < weight.shape[0])
                idx = torch.as_tensor(keys[inside])
                vals = torch.as_tensor(values[inside]).to(weight.dtype)
                weight.index_copy_(0, idx, vals)
                return int((~inside).sum())
        tensor = self._dense.get(table)
        if tensor is None:
            raise KeyError(f"table {table!r} is not published by this publisher")
        at_zero = np.flatnonzero(keys == 0)  # a dense tensor is the row of key 0
        if at_zero.size == 0:
            return len(keys)
        row = values[at_zero[-1]]
        if row.size != tensor.numel():
            raise ValueError(
                f"table {table!r}: a row of {row.size} values for a tensor of shape "
                f"{tuple(tensor.shape)} ({tensor.numel()} values): the model's shape differs "
                f"from the model that wrote it"
            )
        tensor.copy_(torch.as_tensor(row).reshape(tensor.shape).to(tensor.dtype))
        self._dense_seen[table] = (id(tensor), tensor._version)
        return len(keys) - 1

    def close(self) -> None:
        """Remove the forward hooks; pending ids are dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for t in self._tables:
            t.pending = []

    def statistics(self) -> PublisherStatistics:
        """Counters since construction."""
        return PublisherStatistics(
            publishes=self._publishes,
            rows_published=self._rows,
            rows_deleted=self._deleted,
            dense_tensors_published=self._dense_published,
            bytes_published=self._bytes,
            record_time_s=self._record_s,
            publish_time_s=self._publish_s,
        )
