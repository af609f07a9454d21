"""``ekko.bench.scale_serve``'s plan and summary (the measurement itself is a bench): every
mode in every block, the order reversed each block, medians per mode and load."""

from __future__ import annotations

from ekko.bench.scale_serve import MODES, holder_urls, order, summarize


def test_blocks_alternate_the_order_of_the_modes() -> None:
    assert order(3) == [*MODES, *reversed(MODES), *MODES]


def test_the_headline_is_the_lightest_loads_median_over_blocks() -> None:
    p99 = {("local", 1): [2, 4, 3], ("p1", 1): [4, 8, 6], ("p4", 1): [5, 9, 7],
           ("local", 4): [9, 9, 9], ("p1", 4): [10, 30, 20], ("p4", 4): [40, 60, 50],
           ("p4-unmerged", 1): [8, 8, 9], ("p4-unmerged", 4): [70, 80, 90]}  # fmt: skip
    runs = [
        {"mode": m, "concurrency": c, "p99_ms": v, "p50_ms": v / 2, "rps": 100.0 / v,
         "errors": {"503": 1} if (m, c, v) == ("p4", 4, 60) else {}}
        for (m, c), vs in p99.items() for v in vs
    ]  # fmt: skip
    s = summarize(runs, (1, 4))
    assert s["predict_p99_ms"] == {"1": 6, "4": 7} and s["predict_p99_ms_local"] == 3
    assert s["p99_ratio_4_to_1"] == 7 / 6 and s["bar_p99_ratio_le_1_3"]
    assert s["by_load"]["4"]["predict_p99_ms"] == {"1": 20, "4": 50, "local": 9, "4_unmerged": 80}
    assert s["by_load"]["4"]["p99_ratio_4_to_1"] == 2.5 and s["errors"] == 1
    assert s["by_load"]["4"]["p99_ratio_4_unmerged_to_1"] == 4.0
    assert not s["bar_p99_ratio_le_1_3_at_every_load"]


def test_one_partition_is_the_node_holding_the_whole_model_four_are_its_holders() -> None:
    """``p1`` asks ``dc1-all`` (every partition, one frame a batch); ``p4`` asks each
    partition's own holder first and hedges or retries on ``dc1-all``."""

    class Http:
        def url(self, name: str, path: str = "") -> str:
            return f"http://{name}{path}"

    urls = holder_urls(Http(), 4)
    assert urls["1"] == {0: ["http://dc1-all"]}
    assert urls["4"] == {p: [f"http://dc1-p{p}-r0", "http://dc1-all"] for p in range(4)}
