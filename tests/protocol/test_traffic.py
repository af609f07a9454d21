"""Inference-traffic reports: counted at the replica, carried on pull requests, validated on
the wire."""

from __future__ import annotations

import pytest

from ekko.net.errors import RemoteFrameError
from ekko.net.framing import FrameDecoder, encode_frame
from ekko.protocol import Message, PullRequest, TrafficTally
from ekko.protocol.puller import Puller, PullerConfig
from ekko.store import Store


def test_tally_reports_what_was_served_and_heard_since_the_last_report() -> None:
    served = {"ctr": 10}
    tally = TrafficTally(lambda: served)
    assert tally.take() == {"ctr": 10}
    assert tally.take() is None  # nothing new
    served["ctr"] = 25
    served["ads"] = 3
    tally.add({"ctr": 5, "search": 0})
    assert tally.take() == {"ctr": 20, "ads": 3}  # 15 served + 5 heard; zeros left out
    served["ctr"] = 4  # the service was rebuilt: its counter started again
    assert tally.take() == {"ctr": 4}


def test_tally_rejects_a_negative_count_and_keeps_what_it_owed() -> None:
    tally = TrafficTally()
    tally.add({"ctr": 7})
    with pytest.raises(ValueError, match="traffic count of model 'ctr' must be >= 0, got -1"):
        tally.add({"ctr": -1})
    assert tally.take() == {"ctr": 7}


def test_puller_carries_the_report_on_its_next_request() -> None:
    served = {"ctr": 3}
    puller = Puller(
        Store(), PullerConfig(wait_ms=1000, window=2), traffic=TrafficTally(lambda: served)
    )
    ready = puller.start(0.0)
    first, second = (msg for _, msg in ready.sends)
    assert isinstance(first, PullRequest) and first.traffic == {"ctr": 3}
    assert second.traffic is None  # reported once, not once per request


def test_a_negative_count_on_the_wire_is_a_named_frame_error() -> None:
    frame = encode_frame(PullRequest(1, 1 << 20, traffic={"ctr": -5}))
    with pytest.raises(RemoteFrameError, match="traffic"):
        FrameDecoder(message_type=Message).feed(frame)
    (ok,) = FrameDecoder(message_type=Message).feed(
        encode_frame(PullRequest(1, 1 << 20, traffic={"ctr": 5}))
    )
    assert ok.traffic == {"ctr": 5}
