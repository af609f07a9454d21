"""The full-disk fault: a tmpfs as the source's data dir, a ballast file that takes every
free byte, and the watch that records whether the source said so and when it took writes
again."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import httpx

from ekko.ops.chaos.history import History
from ekko.ops.chaos.schedule import Fault


class ChaosSetupError(RuntimeError):
    """The run cannot start (no tmpfs mount, a config chaos cannot run); names why."""


class TmpfsDisk:
    """A small tmpfs mounted as the source's data dir: a full disk is a ballast file that
    takes every free byte, and removing it gives the room back."""

    def __init__(self, mount: Path, size_mb: int) -> None:
        self.mount = mount
        self.size_mb = size_mb
        self.ballast = mount / "ballast"
        self.mounted = False

    def setup(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.mount)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ChaosSetupError(
                f"full-disk faults mount a tmpfs at {self.mount} (needs root): {r.stderr.strip()}"
            )
        self.mounted = True

    def fill(self) -> int:
        """Take every free byte; returns the ballast's size."""
        st = os.statvfs(self.mount)
        with open(self.ballast, "ab", buffering=0) as f:
            try:
                os.posix_fallocate(f.fileno(), 0, max(st.f_bavail * st.f_frsize, 1))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
            f.seek(0, os.SEEK_END)
            for block in (1 << 16, 1 << 12, 1 << 9, 1):  # top up to the last byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * block)
            return f.seek(0, os.SEEK_END)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ballast.unlink()

    def wipe(self) -> None:
        """Delete everything on the disk (the node's data dir is the mount point)."""
        for p in self.mount.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def teardown(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)
            self.mounted = False


class DiskWatch:
    """Records, per full-disk fault, whether the source reported it (``/ready`` 503 naming
    the log or the snapshots, or ``/metrics``: the log failed, a snapshot failure counted),
    how many writes it acknowledged meanwhile (its log's last page still had room: those
    are durable) and the seconds from the room coming back to its next acknowledged write."""

    def __init__(self, history: History, client: httpx.AsyncClient, bound_s: float) -> None:
        self.history = history
        self.client = client
        self.bound_s = bound_s

    async def during(self, f: Fault, url: str) -> None:
        h = self.history
        record = {"fault": f.id, "t": h.now(), "reported": False, "said": None}
        record.update(acked_during=None, recovered_s=None)
        h.disk.append(record)
        before = await self._failures(url)
        end = asyncio.get_running_loop().time() + f.hold
        while asyncio.get_running_loop().time() < end and not record["reported"]:
            try:
                r = await self.client.get(f"{url}/ready", timeout=1.0)
                if r.status_code == 503 and ("wal" in r.text or "snapshots" in r.text):
                    record["reported"], record["said"] = True, r.text[:300]
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)  # polling another process, bounded by the fault's hold
        after = await self._failures(url)
        hit = before is not None and after is not None and (after[0] or after[1] > before[1])
        if not record["reported"] and hit:
            record["reported"], record["said"] = True, f"/metrics: {after}"

    async def after_heal(self, f: Fault, heal_t: float, stop: asyncio.Event) -> None:
        h = self.history
        record = next(d for d in h.disk if d["fault"] == f.id)
        record["acked_during"] = sum(record["t"] <= w.at <= heal_t for w in h.writes)
        deadline = heal_t + self.bound_s
        while not stop.is_set() and h.now() < deadline:
            if h.writes and h.writes[-1].at > heal_t:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        if h.writes and h.writes[-1].at > heal_t:
            later = next(w for w in h.writes if w.at > heal_t)
            record["recovered_s"] = round(later.at - heal_t, 3)

    async def _failures(self, url: str) -> tuple[bool, float] | None:
        """From the source's ``/metrics``: has its log failed, how many snapshots failed."""
        try:
            text = (await self.client.get(f"{url}/metrics", timeout=2.0)).text
        except httpx.HTTPError:
            return None
        wal_failed, snapshot_failures = False, 0.0
        for line in text.splitlines():
            if line.startswith("ekko_wal_failed{"):
                wal_failed = float(line.rsplit(" ", 1)[1]) >= 1
            elif line.startswith("ekko_task_failures_total{") and 'task="snapshots"' in line:
                snapshot_failures = float(line.rsplit(" ", 1)[1])
        return wal_failed, snapshot_failures
