"""Runs ``ekko demo`` in its own process for the end-to-end tests (no test functions here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_demo(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """``ekko demo ARGS --json`` in its own process; returns the JSON it wrote."""
    return run_demo_process(tmp_path, *args, timeout=timeout)[0]


def run_demo_process(
    tmp_path: Path, *args: str, timeout: float
) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    """``ekko demo ARGS --json``: the JSON it wrote and the process (its stdout, stderr)."""
    out = tmp_path / "demo.json"
    cmd = [sys.executable, "-m", "ekko", "demo", *args, "--json", str(out),
           "--workdir", str(tmp_path / "cluster")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc
