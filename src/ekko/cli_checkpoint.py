"""``ekko export`` and ``ekko load``: the commands' options; the work is
``ekko.ops.checkpoints``'s.

Why a module of its own: ``cli.py`` is shared by every command and kept to their wiring."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from ekko.cli_options import console, read_cluster


def export(
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    model: str = typer.Option("ctr", help="The [[models]] entry to export."),
    out: Path = typer.Option(..., help="The file to write (.safetensors)."),
) -> None:
    """Write MODEL as the source holds it now to a safetensors file: tensors named as the
    torch model's state_dict keys (embedding tables [rows_per_table, dim], dense weights),
    one consistent cut across its tables, the versions in the file's metadata. Load it with
    safetensors.torch.load_file and model.load_state_dict."""
    from ekko.ops.checkpoints import CheckpointError, export_model

    err = console
    cfg, secret = read_cluster(config, err)
    try:
        done = export_model(cfg, config.resolve().parent, secret, model, out)
    except (CheckpointError, OSError) as exc:
        err.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    print(f"{done.path}: {done.tensors} tensors, {done.size / 2**20:.1f} MiB, lineage "
          f"{done.metadata['lineage']}")  # fmt: skip


def load(
    config: Path = typer.Option(Path("cluster.toml"), help="Cluster config (TOML)."),
    model: str = typer.Option("ctr", help="The [[models]] entry to load into."),
    from_file: Path = typer.Option(
        ..., "--from", help="A torch state_dict (.pt) or a .safetensors file."
    ),
) -> None:
    """Write a checkpoint's tensors into MODEL's tables at the source (binary row writes,
    signed, through its write port; replicas pull them as any write). The whole file is
    checked against the model and the source's tables first: a wrong key, shape or dtype,
    a NaN or a value beyond max_abs is named and nothing is written. The source's trainer
    keeps its own weights until it restarts (it resumes from the store then)."""
    from ekko.ops.checkpoints import CheckpointError, load_model

    err = console
    cfg, _ = read_cluster(config, err)
    shown = {"at": 0.0}
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, table: str) -> None:
        now = time.monotonic()
        if done < total and now - shown["at"] < (0.2 if tty else 5.0):
            return
        shown["at"] = now
        line = f"loading: {done:,}/{total:,} rows ({100 * done / total:.0f} %), table {table}"
        if tty:
            err.print(line, end="\r", soft_wrap=True, highlight=False)
        else:
            err.print(line, highlight=False)

    try:
        done = load_model(cfg, config, model, from_file, progress)
    except (CheckpointError, OSError) as exc:
        err.print(f"\n[red]load failed:[/red] {exc}" if tty else f"load failed: {exc}")
        raise typer.Exit(1) from exc
    if tty:
        err.print()  # past the progress line
    print(f"loaded {done.tensors} tensors, {done.rows:,} rows into model {model} at the "
          f"source (versions up to {done.max_version})")  # fmt: skip
