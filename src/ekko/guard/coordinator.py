"""The coordinator's view of a partitioned cluster: the other partition sources it commands,
the holders whose restores it checks, and the merging of their answers.

Why apart from ``SourceGuard``: the single-partition guard has one source and its replicas;
on ``P`` partitions the coordinator (the source of partition 0) also waits for every other
source's restore answer (message 4 of the design), merges their watermarks for the holders
(message 5), and compares each holder's digest per (table, partition) with the source of
that partition (message 6). These rules are pure functions of the messages, tested alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.guard.reports import ReportError
from ekko.store.placement import Placement

Send = Callable[[str, str, dict[str, Any]], None]
"""``send(node, path, body)``: a signed post to another node's admin API, in the background."""

SourceResults = dict[str, "dict[str, Any] | str"]
"""Each other source's restore answer, or why there is none (an error, a timeout)."""

RestoreRemote = Callable[[dict[str, Any], Callable[[SourceResults], None]], None]
"""``restore_remote(body, done)``: post ``body`` to every other source's ``guard/restore`` and
call ``done(results)`` once each has answered or timed out (on the node's loop)."""


class HolderReportError(ReportError):
    """A holder's ``restored`` report the coordinator cannot use: not a holder, another
    partition's digest, or another epoch's. The message names the node and the problem."""


@dataclass
class PartitionPlan:
    """Who the coordinator commands and checks on a partitioned cluster.

    Args:
        placement: the cluster's placement (which partition holds each table's shards).
        partitions: the coordinator's own partitions (it is their source).
        sources: every other partition source and the partitions it is the source of.
        holders: every holder (a syncing non-source node) and the partitions it holds: each
            reports ``restored`` after a rollback.
        send: posts a message to one node (checkpoints, redirects, the end of an incident).
        restore_remote: commands every other source's restore and reports their answers.
        inexact: holders whose rows may come through a lossy row codec, and that codec:
            their digests cannot match the sources' bit for bit (``split_lossy``).
    """

    placement: Placement
    partitions: tuple[int, ...]
    sources: dict[str, tuple[int, ...]]
    holders: dict[str, tuple[int, ...]]
    send: Send
    restore_remote: RestoreRemote
    inexact: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        covered = set(self.partitions).union(*self.sources.values())
        missing = [p for p in range(self.placement.partitions) if p not in covered]
        if missing:
            raise ValueError(f"PartitionPlan: no source for partitions {missing}")

    def source_map(self, coordinator: str) -> dict[str, str]:
        """``{str(p): the name of p's source}`` for every partition."""
        out = {p: coordinator for p in self.partitions}
        for name, parts in self.sources.items():
            out.update(dict.fromkeys(parts, name))
        return {str(p): out[p] for p in sorted(out)}

    def describe(self, coordinator: str) -> dict[str, Any]:
        """The coordinator's health page's view: each partition's source, each holder's."""
        return {
            "sources": self.source_map(coordinator),
            "holders": {n: list(p) for n, p in self.holders.items()},
        }


def merge_watermarks(answers: Iterable[Mapping[str, Any]]) -> dict[str, list]:
    """Each table's knowledge (shard x lane) as the elementwise max over every source's
    answer: a holder must cover each source's restore on the shards that source owns."""
    out: dict[str, np.ndarray] = {}
    for a in answers:
        for table, mark in a.get("watermark", {}).items():
            arr = np.asarray(mark, dtype=np.int64)
            prev = out.get(table)
            if prev is not None and prev.shape != arr.shape:
                raise ValueError(
                    f"watermark of table {table!r}: shapes {prev.shape} and {arr.shape} differ "
                    f"between sources ({a.get('node')})"
                )
            out[table] = arr if prev is None else np.maximum(prev, arr)
    return {t: m.tolist() for t, m in out.items()}


def by_partition(answers: Iterable[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """``{table: {str(p): value}}`` from each source's ``answer[key]`` (its partitions only)."""
    out: dict[str, dict[str, Any]] = {}
    for a in answers:
        own = {str(p) for p in a.get("partitions", [])}
        for table, per in a.get(key, {}).items():
            out.setdefault(table, {}).update({p: v for p, v in per.items() if p in own})
    return out


def holder_mismatches(
    plan: PartitionPlan,
    node: str,
    epoch: int | None,
    expected_epoch: int,
    digests: Mapping[str, Any],
    source_digests: Mapping[str, Mapping[str, str]],
) -> list[str]:
    """The ``table/partition`` pairs where holder ``node``'s digest differs from its source's
    (or the source gave none); ``HolderReportError`` for a report that cannot be compared."""
    held = plan.holders.get(node)
    if held is None:
        raise HolderReportError(f"node: {node!r} holds no partition of this model")
    if epoch is not None and epoch != expected_epoch:
        raise HolderReportError(
            f"epoch: {node} reports restoring epoch {epoch}; the rollback in progress is "
            f"epoch {expected_epoch}"
        )
    bad: list[str] = []
    for table, per in digests.items():
        if not isinstance(per, Mapping):
            raise HolderReportError(
                f"digests.{table}: expected {{partition: hex16}} on a partitioned cluster"
            )
        for p, d in per.items():
            if not str(p).isdigit() or int(p) not in held:
                raise HolderReportError(
                    f"digests.{table}: {node} reports partition {p}, which it does not hold "
                    f"(it holds {list(held)})"
                )
            if source_digests.get(table, {}).get(str(p)) != d:
                bad.append(f"{table}/{p}")
    return bad


def summary(answer: Mapping[str, Any]) -> dict[str, Any]:
    """What an incident keeps of a source's restore answer."""
    keys = ("partitions", "checkpoint_at", "rows_restored", "bytes_restored", "write_s")
    return {k: answer.get(k) for k in keys}


def collect_answers(
    plan: PartitionPlan, inc: dict[str, Any], own: dict[str, Any], results: SourceResults
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every source's answer to the restore of ``inc`` (the coordinator's ``own`` first),
    totals and per-partition digests and rows into ``inc``; and the sources that did not
    restore (no answer in time, an error, another epoch's answer) with why."""
    answers = [own]
    failed: dict[str, dict[str, Any]] = {}
    for name, parts in plan.sources.items():
        r = results.get(name, "no answer")
        if isinstance(r, dict) and r.get("epoch") == inc["epoch"]:
            answers.append(r)
            inc["sources"][name] = summary(r)
        else:
            why = r if isinstance(r, str) else f"answered epoch {r.get('epoch')}"
            failed[name] = {"partitions": list(parts), "error": why}
    inc["sources_pending"] = []
    for key in ("rows_restored", "bytes_restored", "source_mismatches"):
        inc[key] = sum(int(a.get(key, 0)) for a in answers)
    inc["source_digests"] = by_partition(answers, "digests")
    inc["source_rows"] = by_partition(answers, "rows")
    return answers, failed


def failure_text(epoch: int, failed: Mapping[str, Mapping[str, Any]]) -> str:
    """Why a rollback is not complete: the sources that did not restore, and what now."""
    names = "; ".join(
        f"{n} (partitions {f['partitions']}): {f['error']}" for n, f in failed.items()
    )
    return (
        f"rollback epoch {epoch}: not restored at {names}; traffic stays on the baseline "
        "until a rollback restores every source"
    )


def split_lossy(
    plan: PartitionPlan, mismatched: Mapping[str, list[str]]
) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """``(exact, lossy)``: the holders' mismatched (table, partition) pairs, those of holders
    behind a lossy codec apart (``{node: {"codec", "pairs"}}``): a quantized row differs from
    its source's by design, so their digests say nothing about rows lost."""
    exact = {n: m for n, m in mismatched.items() if n not in plan.inexact}
    lossy = {
        n: {"codec": plan.inexact[n], "pairs": m}
        for n, m in mismatched.items()
        if n in plan.inexact and m
    }
    return exact, lossy


def rows_lost(mismatched: Mapping[str, list[str]], source_rows: Mapping[str, Any]) -> int:
    """Rows of the (table, partition) pairs a holder disagrees on, by the sources' counts."""
    out = 0
    for pairs in mismatched.values():
        for pair in pairs:
            table, p = pair.rsplit("/", 1)
            out += int(source_rows.get(table, {}).get(p, 0))
    return out
