"""The nemesis harness (``ekko chaos``): faults on a real cluster, a checker for the promises.

``schedule`` draws the faults from a seed, ``proxy`` owns the links, ``faults`` injects and
heals, ``writer`` / ``training`` / ``probes`` are the clients and observers, ``history``
records, ``checker`` judges, ``harness`` runs it all.
"""

from ekko.ops.chaos.checker import Verdict, check
from ekko.ops.chaos.harness import ChaosRun, ChaosSettings, default_cluster_doc, run_chaos
from ekko.ops.chaos.history import History
from ekko.ops.chaos.schedule import Fault, FaultKind, Timing, Topology, generate

__all__ = [
    "ChaosRun",
    "ChaosSettings",
    "Fault",
    "FaultKind",
    "History",
    "Timing",
    "Topology",
    "Verdict",
    "check",
    "default_cluster_doc",
    "generate",
    "run_chaos",
]
