"""A rollback writes the healthy rows back into the trainer and drops only the optimizers'
momentum (issue 13 §3): a fresh optimizer restarted Adam's bias correction, whose first steps
moved every touched weight by a full learning rate, and the demo's replicas took longer to
return to their pre-poison quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko.train.dlrm import embedding_table_name
from ekko.train.service import TrainingService
from ekko.train.sink import MemorySink
from ekko.train.streams import SyntheticStream


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_load_rows_restores_the_rows_and_keeps_second_moments(
    small_model_config, small_stream_config, optimizer
):
    from ekko.train.trainer import TrainerConfig

    svc = TrainingService(
        "ctr", small_model_config, MemorySink(), trainer=TrainerConfig(optimizer=optimizer)
    )
    batches = SyntheticStream(small_stream_config).batches(64)
    for _ in range(5):
        svc.trainer.step(next(batches))
    before = [
        {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
        for opt in svc.trainer.optimizers
        for st in opt.state.values()
    ]
    table = embedding_table_name(0)
    keys = np.array([1, 2, 3], np.int64)
    svc.quarantine("test")
    svc.load_rows({table: (keys, np.full((3, small_model_config.embedding_dim), 0.5))})
    weight = svc.model.sparse.embedding_bags[table].weight.detach().numpy()
    np.testing.assert_array_equal(weight[keys], 0.5)
    after = [st for opt in svc.trainer.optimizers for st in opt.state.values()]
    assert len(after) == len(before) > 0  # the optimizer state is kept, not started afresh
    for old, new in zip(before, after, strict=True):
        for name, value in old.items():
            if name == "exp_avg":
                assert not new[name].any()  # momentum points where the undone updates went
            else:
                torch.testing.assert_close(new[name], value)  # second moments, steps, sums
