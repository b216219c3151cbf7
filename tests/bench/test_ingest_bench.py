"""The ingest benchmark runs end to end in its quick form: a 3,000-message backlog drained
by mosquitto_sub and by the fedgate ingest, on a private broker, and the table prints."""

from __future__ import annotations

import pytest

from bench.ingest.run import HEADERS, MOSQUITTO, MOSQUITTO_SUB, main, run, table_row

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (MOSQUITTO.exists() and MOSQUITTO_SUB.exists()), reason="needs mosquitto(-clients)"
    ),
]


def test_quick_drain_of_both_consumers() -> None:
    count = 3000
    drains = run(
        count=count,
        payload_bytes=1024,
        with_paho=False,
        batch_max=2000,
        timeout_s=120,
    )
    reference, fedgate = drains
    assert reference.consumer.startswith("mosquitto_sub")
    # both consumers got the whole backlog (run() raises when a file or buffer falls short)
    assert reference.messages == fedgate.messages == count
    assert fedgate.rate > 0
    assert fedgate.cpu_seconds > 0
    assert fedgate.commits is not None
    assert 1 <= fedgate.commits <= count
    row = table_row(fedgate, reference)
    assert len(row) == len(HEADERS)
    assert row[1] == count


def test_the_command_line_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--no-paho"]) == 0
    out = capsys.readouterr().out
    assert "fedgate ingest, MQTT 5" in out
    assert "vs mosquitto_sub" in out
