"""Run seeds, judge each by the invariant, and sum up: ``ekko sim``'s engine.

A seed fails when the healed cluster does not converge in bounded simulated time, when a
replica then differs from the source (``check``), or when any exception escapes the protocol
objects, the store or the scheduler (the run stops there; its traceback is the detail).
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ekko.sim.check import MAX_REPORTED, differences, knowledge_converged
from ekko.sim.scenario import Scenario, draw_scenario
from ekko.sim.world import World


@dataclass
class SeedResult:
    """What one seed did and whether the invariant held: enough to report a failure (the
    scenario, the first differing rows) and to compare two runs of it (``trace_hash``)."""

    seed: int
    scenario: Scenario
    reason: str | None  # None: the invariant held
    details: list[str] = field(default_factory=list)  # first differing rows, or a traceback
    features: Counter[str] = field(default_factory=Counter)
    trace_hash: str = ""  # every event and the final stores' digests
    sim_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None

    def report(self) -> str:
        """What a person needs to look at a failure, and the command that replays it."""
        lines = [
            f"seed {self.seed} FAILED: {self.reason}",
            f"  scenario: {self.scenario.compact()}",
            *(f"  {d}" for d in self.details),
            f"  replay: ekko sim --replay {self.seed} -v",
        ]
        return "\n".join(lines)


def run_seed(seed: int, log: Callable[[str], None] | None = None) -> SeedResult:
    """Draw seed's scenario, run it, check it. ``log`` gets each action as it happens."""
    scenario = draw_scenario(seed)
    result = SeedResult(seed, scenario, None)
    world: World | None = None
    try:
        world = World(scenario, log)
        _run(world, result)
    except Exception as exc:  # the finding: an exception escaped the protocol objects
        result.reason = f"exception {type(exc).__name__}: {exc}"
        result.details = traceback.format_exc().rstrip().splitlines()
    if world is not None:
        nodes = world.net.nodes
        result.features = world.finish_features()
        digests = sorted((n, sorted(v.store.digests().items())) for n, v in nodes.items())
        result.trace_hash = f"{world.net.trace_hash}:{hash_text(repr(digests))}"
        result.sim_s = world.net.now
    return result


def _run(world: World, result: SeedResult) -> None:
    nodes, replicas = world.net.nodes, world.sc.replicas
    world.run()
    unsettled = world.settle(
        lambda: knowledge_converged({n: v.store for n, v in nodes.items()}, replicas)
    )
    world.check_knowledge()
    diffs = differences({n: v.store for n, v in nodes.items()}, world.paths, world.source_restarts)
    if world.overclaim is not None:
        at, claimed = world.overclaim
        result.reason = f"a replica's knowledge claimed rows it lacked at {at:.4f} s"
        diffs = claimed + diffs
    elif unsettled is not None:
        result.reason = unsettled
    elif diffs:
        result.reason = "a replica differs from the source"
    result.details = [str(d) for d in diffs[:MAX_REPORTED]]
    if len(diffs) > MAX_REPORTED:
        result.details.append(f"... {len(diffs) - MAX_REPORTED} more differences")


def hash_text(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class Summary:
    """Seeds run, failures, and how many seeds exercised each feature: a clean run means
    little unless the rare paths (full scans, racing timeouts, restarts) were taken."""

    seeds: int = 0
    start: int = 0
    failures: list[SeedResult] = field(default_factory=list)
    coverage: Counter[str] = field(default_factory=Counter)  # feature -> seeds that had it
    elapsed_s: float = 0.0
    sim_s: float = 0.0

    def add(self, result: SeedResult) -> None:
        self.seeds += 1
        self.sim_s += result.sim_s
        self.coverage.update(set(result.features))
        if not result.ok:
            self.failures.append(result)

    def to_json(self) -> dict:
        return {
            "seeds": self.seeds,
            "start": self.start,
            "failures": [
                {
                    "seed": f.seed,
                    "reason": f.reason,
                    "details": f.details[:10],
                    "scenario": f.scenario.compact(),
                    "replay": f"ekko sim --replay {f.seed} -v",
                }
                for f in self.failures
            ],
            "elapsed_s": round(self.elapsed_s, 2),
            "simulated_s": round(self.sim_s, 1),
            "coverage": dict(sorted(self.coverage.items())),
        }


def run_seeds(
    seeds: Iterable[int],
    *,
    on_result: Callable[[SeedResult], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Summary:
    """Run every seed; ``on_result`` sees each result as it comes (progress, failures).
    ``clock`` only times the run: nothing a seed does reads it."""
    seeds = list(seeds)
    summary = Summary(start=seeds[0] if seeds else 0)
    t0 = clock()
    for seed in seeds:
        result = run_seed(seed)
        summary.add(result)
        if on_result is not None:
            on_result(result)
    summary.elapsed_s = clock() - t0
    return summary
