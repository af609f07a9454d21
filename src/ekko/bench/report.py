"""Bench results: one JSON (inputs, machine, figures, ``summary``) and one PNG beside it."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

RESULTS_DIR = Path("bench/results")


def machine() -> dict[str, Any]:
    import psutil

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg": os.getloadavg(),
    }


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def write_result(
    name: str,
    inputs: dict[str, Any],
    summary: dict[str, Any],
    details: dict[str, Any],
    out: Path | None,
    plot: Callable[[Figure], None] | None,
) -> Path:
    """Write ``out`` (default ``bench/results/NAME.json``) and a PNG with the same stem."""
    out = Path(out) if out else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "inputs": inputs,
        "summary": summary,
        "details": details,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=_jsonable))
    os.replace(tmp, out)
    if plot is not None:
        fig = plt.figure(figsize=(9, 5))
        plot(fig)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        plt.close(fig)
    return out


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
