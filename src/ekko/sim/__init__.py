"""Deterministic simulation: the sync protocol, the store, the scheduler and the source's
recovery under a seeded clock and network, as FoundationDB tests its core (``ekko sim``).

Each seed draws a cluster and its trouble (``scenario``), runs it on ``SimNetwork``
(``world``), and checks that once writes stop and links heal every replica equals the source
(``check``); ``runner`` runs many seeds and counts which features each exercised.
"""

from ekko.sim.runner import SeedResult, Summary, run_seed, run_seeds
from ekko.sim.scenario import RESTART_KINDS, Scenario, draw_scenario

__all__ = [
    "RESTART_KINDS",
    "Scenario",
    "SeedResult",
    "Summary",
    "draw_scenario",
    "run_seed",
    "run_seeds",
]
