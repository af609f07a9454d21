"""A restarted source keeps the model it trained (issue 13 §2), across real processes.

The source trains a model from labelled batches posted to it; replicas converge. The source is
killed with SIGKILL and restarted, once with its data dir (snapshot + write-ahead log) and once
without (its store rebuilt from the replicas). Each time the model's tables at the source and
at every replica are those before the kill (digests), every replica predicts a held-out batch
exactly as before, and training goes on from there: the new trainer's step count grows, its
predictions stay finite and the held-out AUC stays at the trained level.

On the old main the restarted trainer began again from its seed weights and its start-up
publish wrote them over the trained dense tensors, which spread to every replica: the source
served an untrained model after every restart."""

from __future__ import annotations

import math
import shutil
import threading

import httpx
import numpy as np
import pytest
import torch
from cluster_checks import until

from ekko.ops.launcher import LocalCluster
from ekko.quality.offline import auc
from ekko.train.dlrm import DLRM
from ekko.train.streams import Events, StreamConfig, SyntheticStream

pytestmark = pytest.mark.integration

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 0.0}
REPLICAS = ("dc1-r0", "dc2-r0")
STREAM = StreamConfig(seed=5, max_vocab=1000, initial_items=500)


def _body(batch: Events, labels: bool = True) -> dict:
    doc = {"dense": batch.dense.tolist(), "sparse": batch.sparse.tolist()}
    if labels:
        doc["labels"] = batch.labels.astype(int).tolist()
    return doc


class Feeder(threading.Thread):
    """Posts labelled batches to the source's trainer while not paused; a batch the source
    does not take (down, recovering, busy) is sent again, so ``sent`` counts taken ones.
    Every ``HOLD_EVERY``-th batch of the stream is held out instead: never trained on."""

    HOLD_EVERY = 8

    def __init__(self, cluster: LocalCluster) -> None:
        super().__init__(daemon=True)
        self.url = cluster.url("source", "/v1/models/ctr/train")
        self.auth = cluster.auth
        self.batches = SyntheticStream(STREAM).batches(128)
        self.drawn = 0
        self.held: list[Events] = []
        self.stop, self.paused, self.idle = threading.Event(), threading.Event(), threading.Event()
        self.sent = 0

    def _next(self) -> dict:
        while True:
            batch = next(self.batches)
            self.drawn += 1
            if self.drawn % self.HOLD_EVERY:
                return _body(batch)
            self.held.append(batch)

    def held_out(self, n: int = 16) -> Events:
        """The last ``n`` held-out batches as one (the stream drifts: recent ones)."""
        h = self.held[-n:]
        return Events(*(np.concatenate([getattr(b, f) for b in h])
                        for f in ("dense", "sparse", "labels", "ts")))  # fmt: skip

    def run(self) -> None:
        with httpx.Client(timeout=5.0, auth=self.auth) as client:
            body = self._next()
            while not self.stop.is_set():
                if self.paused.is_set():
                    self.idle.set()
                    self.stop.wait(0.01)  # waiting to be resumed
                    continue
                try:
                    r = client.post(self.url, json=body)
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 202:
                    self.sent += 1
                    body = self._next()
                else:
                    self.stop.wait(0.05)  # the source is down, recovering or busy: again
        self.idle.set()

    def pause(self) -> None:
        """Return once no request is in flight and none will be sent until resumed."""
        self.paused.set()
        self.idle.clear()  # set again only by a loop pass that began after the pause
        assert self.idle.wait(15)


def _model_digests(cluster: LocalCluster, name: str) -> dict[str, str]:
    tables = cluster.get(name, "/v1/status")["tables"]
    return {t: v["digest"] for t, v in tables.items() if t.startswith(("dense/", "emb_"))}


def _train_report(cluster: LocalCluster) -> dict:
    return cluster.get("source", "/v1/models/ctr/train")


def _settled(cluster: LocalCluster, trained: int) -> dict[str, str]:
    """Wait until the trainer has trained ``trained`` batches and every replica holds the
    source's model; its digests."""
    until(f"{trained} batches trained", lambda: _train_report(cluster)["batches"] >= trained)
    want = _model_digests(cluster, "source")
    _replicas_hold(cluster, want)
    return want


def _replicas_hold(cluster: LocalCluster, want: dict[str, str]) -> None:
    until("replicas converged", lambda: all(_model_digests(cluster, r) == want for r in REPLICAS))


def _predict(cluster: LocalCluster, name: str, batch: Events) -> np.ndarray:
    r = cluster.post(name, "/v1/models/ctr/predict", _body(batch, labels=False))
    assert r.status_code == 200, (name, r.text)
    ctrs = [p["ctr"] for p in r.json()["predictions"]]
    assert all(isinstance(c, float) and math.isfinite(c) for c in ctrs), (name, ctrs[:5])
    return np.asarray(ctrs)


def test_restarted_source_keeps_training_its_model(make_cluster):
    cluster = make_cluster(
        dcs=2, replicas=1, serve=True, models=[MODEL], sync={"snapshot_interval_s": 1.0}
    )
    cluster.start(timeout=120)
    untrained = DLRM(cluster.config.model("ctr").dlrm()).eval()
    feeder = Feeder(cluster)
    feeder.start()
    life_started = 0  # batches the feeder had sent when this source process started
    try:
        until("60 batches trained", lambda: _train_report(cluster)["batches"] >= 60)
        for wipe in (False, True):
            feeder.pause()
            before = _settled(cluster, feeder.sent - life_started)
            held_out = feeder.held_out()
            seed_auc = auc(held_out.labels, _local_predict(untrained, held_out))
            preds = {r: _predict(cluster, r, held_out) for r in REPLICAS}
            trained_auc = auc(held_out.labels, preds[REPLICAS[0]])
            assert trained_auc > seed_auc + 0.05, (trained_auc, seed_auc)

            cluster.kill("source")
            if wipe:  # the store comes back from the replicas
                shutil.rmtree(cluster.log_dir / "source")
            cluster.restart("source", timeout=120)
            life_started = feeder.sent

            assert _model_digests(cluster, "source") == before  # nothing overwritten
            assert _train_report(cluster)["batches"] == 0  # a new trainer, not yet fed
            _replicas_hold(cluster, before)
            for r in REPLICAS:
                np.testing.assert_array_equal(_predict(cluster, r, held_out), preds[r])

            feeder.paused.clear()  # training goes on from there, and replicas follow
            until("30 batches trained", lambda: _train_report(cluster)["batches"] >= 30)
            feeder.pause()
            _settled(cluster, feeder.sent - life_started)
            report = _train_report(cluster)
            assert report["failed"] is None and sum(report["rejected_steps"].values()) == 0
            assert report["last_loss"] is not None and math.isfinite(report["last_loss"])
            for r in REPLICAS:
                now_auc = auc(held_out.labels, _predict(cluster, r, held_out))
                assert now_auc > trained_auc - 0.03, (r, now_auc, trained_auc, seed_auc)
    finally:
        feeder.stop.set()
        feeder.join(10)


def _local_predict(model: DLRM, batch: Events) -> np.ndarray:
    with torch.no_grad():
        dense = torch.as_tensor(batch.dense, dtype=torch.float32)
        sparse = torch.as_tensor(batch.sparse, dtype=torch.int64)
        return torch.sigmoid(model(dense, sparse)).numpy()
