"""The consensus benchmark runs end to end: 4 clouds, 1 silent, 2 heights, tiny model."""

from __future__ import annotations

import pytest

from bench.consensus.brokers import MOSQUITTO
from bench.consensus.run import HEADERS, SMALL_MODEL, right_aligned, table_row
from bench.consensus.scenario import KINDS, Scenario, run_scenario, silent_indices

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs the mosquitto binary"),
]


async def test_four_clouds_with_one_silent_agree_and_count_their_traffic() -> None:
    scenario = Scenario(clouds=4, silent=silent_indices(4, 1, "spread"))
    assert scenario.honest == ("c1", "c2", "c3")

    result = await run_scenario(scenario, heights=2, spec=SMALL_MODEL, height_timeout_s=30.0)

    # run_scenario raises BenchDisagreement unless every honest store holds the same chain;
    # here the decided digests are checked once more, and that each height moved the chain.
    assert [s.height for s in result.samples] == [1, 2]
    assert len({s.digest for s in result.samples}) == 2
    assert (result.clouds, result.faulty, result.quorum, result.silent) == (4, 1, 3, ("c4",))
    for sample in result.samples:
        assert sample.latency_s > 0
        assert sample.rounds >= 1
        for kind in KINDS:
            assert sample.messages[kind] > 0, kind
            assert sample.payload_bytes[kind] > 0, kind
        # Each of the 3 honest clouds publishes its aggregate and the decided model once.
        assert sample.messages["aggregate"] == 3
        assert sample.messages["model"] == 3
    assert result.messages_per_decision() > 0
    assert result.kb_per_decision() > 0
    row = table_row(result)
    assert len(right_aligned(HEADERS, [row])[0]) == len(HEADERS)
