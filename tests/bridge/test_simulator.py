"""The TEP plant simulator: a deterministic plant, served over real OPC-UA and Modbus TCP
servers on free loopback ports, and the `simulate` command run as a subprocess."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import struct
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.client import Client
from fedgate_bridge.config import load_config, parse_config
from fedgate_bridge.errors import ConfigError, SimulatorError
from fedgate_bridge.simulator.exit_codes import SimulateExitCode
from fedgate_bridge.simulator.live_plant import LivePlant
from fedgate_bridge.simulator.modbus_server import PlantModbusServer
from fedgate_bridge.simulator.opcua_server import PlantOpcUaServer
from fedgate_bridge.simulator.register_map import (
    FAULT_TAG,
    FEATURE_TAGS,
    HOLDING_REGISTER_COUNT,
    OPCUA_NAMESPACE_URI,
    TAG_UNITS,
    TAGS,
    bridge_config_for,
    float32_registers,
    holding_slots,
    opcua_node_id,
)
from fedgate_bridge.simulator.tep_plant import (
    FaultSchedule,
    FaultSpec,
    PlantSample,
    TepPlant,
    kernel_seed,
    parse_fault_spec,
)
from pymodbus.client import AsyncModbusTcpClient

from tests.net_support import free_port

# Means and standard deviations of the fault-free Braatz training run (d00.dat, 500
# samples at 3 min) for the tags the regulatory control holds tightest.
D00_REFERENCE = {
    "XMEAS_1": (0.2511, 0.0285),
    "XMEAS_2": (3663.5, 32.0),
    "XMEAS_4": (9.344, 0.0764),
    "XMEAS_7": (2705.4, 5.26),
    "XMEAS_8": (74.98, 0.528),
    "XMEAS_9": (120.40, 0.0186),
    "XMEAS_17": (22.91, 0.626),
    "XMEAS_40": (53.65, 0.535),
    "XMEAS_41": (43.89, 0.489),
}


def as_float32(value: float) -> float:
    result: float = struct.unpack(">f", struct.pack(">f", value))[0]
    return result


@pytest.fixture(scope="module")
def stepped_plant() -> tuple[TepPlant, list[PlantSample]]:
    """A fault-free plant and its first simulated hour (21 samples)."""
    plant = TepPlant(seed=0)
    return plant, [plant.current] + [plant.step() for _ in range(20)]


# -- fault specs and schedules (no plant) ---------------------------------------------


def test_fault_specs_parse_with_defaults() -> None:
    assert parse_fault_spec("IDV6") == FaultSpec(6, 0.0, 1.0)
    assert parse_fault_spec("6:1.5") == FaultSpec(6, 1.5, 1.0)
    assert parse_fault_spec("idv_13:0.5:0.25") == FaultSpec(13, 0.5, 0.25)
    assert parse_fault_spec("IDV(4)::0.5") == FaultSpec(4, 0.0, 0.5)
    assert str(FaultSpec(6, 1.0, 0.5)) == "IDV6:1:0.5"


@pytest.mark.parametrize(
    "text", ["IDV0", "IDV29", "IDV6:-1", "IDV6:1:0", "IDV6:1:1.5", "IDV6:x", "fault", "6:1:1:1"]
)
def test_bad_fault_specs_say_what_to_fix(text: str) -> None:
    with pytest.raises(ConfigError, match="IDV"):
        parse_fault_spec(text)


def test_schedule_latches_faults_and_labels_the_lowest() -> None:
    schedule = FaultSchedule((FaultSpec(4, 1.0), FaultSpec(2, 2.0, 0.5), FaultSpec(4, 3.0, 0.25)))
    assert schedule.label(0.99) == 0
    assert schedule.active(0.99) == ()
    assert schedule.label(1.0) == 4
    assert schedule.label(2.5) == 2
    assert schedule.active(2.5) == (2, 4)
    vector = schedule.activation(2.5)
    assert len(vector) == 28
    assert (vector[1], vector[3]) == (0.5, 1.0)
    assert schedule.activation(3.0)[3] == 0.25  # the entry started last sets the magnitude
    assert schedule.change_times() == (1.0, 2.0, 3.0)


def test_kernel_seeds_are_odd_and_distinct() -> None:
    seeds = [kernel_seed(s) for s in range(200)]
    assert kernel_seed(0) == 1431655765.0  # the kernel's own default
    assert all(int(s) % 2 == 1 and 0 < s < 2**32 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(ConfigError):
        kernel_seed(-1)


# -- the plant -------------------------------------------------------------------------


def test_same_seed_and_faults_give_the_same_values() -> None:
    faults = [FaultSpec(1, 0.1), FaultSpec(8, 0.2, 0.5)]
    first = TepPlant(seed=5, faults=faults)
    second = TepPlant(seed=5, faults=faults)
    other_seed = TepPlant(seed=6, faults=faults)
    for _ in range(6):
        a, b, c = first.step(), second.step(), other_seed.step()
        assert a == b
        assert a.values[:41] != c.values[:41]  # noise differs with the seed


def test_fault_tag_switches_at_start_and_the_process_follows() -> None:
    faulty = TepPlant(seed=0, faults=[FaultSpec(1, 0.15)])  # sample 3
    half = TepPlant(seed=0, faults=[FaultSpec(1, 0.15, 0.5)])
    normal = TepPlant(seed=0)
    labels, max_difference = [], []
    for _ in range(6):
        a, b = faulty.step(), normal.step()
        half.step()
        labels.append(a.value(FAULT_TAG))
        max_difference.append(
            max(abs(x - y) for x, y in zip(a.values[:52], b.values[:52], strict=True))
        )
    assert labels == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert faulty.current.active_faults == (1,)
    assert max_difference[:3] == [0.0, 0.0, 0.0]  # identical until the fault starts
    assert min(max_difference[3:]) > 0.5  # then IDV1 moves the plant
    # MAGNITUDE scales the disturbance: half of IDV1 moves reactor pressure about half as far.
    full_move = faulty.current.value("XMEAS_7") - normal.current.value("XMEAS_7")
    half_move = half.current.value("XMEAS_7") - normal.current.value("XMEAS_7")
    assert abs(full_move) > 2.0
    assert 0.35 < half_move / full_move < 0.65


def test_a_plant_trip_exits_7_with_the_reason() -> None:
    # IDV6 (A feed loss) empties the stripper; a coarse control step gets there in seconds.
    result = run_simulate(
        *("--fault", "IDV6", "--control-seconds", "36", "--speed", "1000000"),
        *("--modbus-port", str(free_port())),
    )
    assert result.returncode == SimulateExitCode.SIMULATOR_FAILED
    assert "the plant shut down at 7." in result.stderr
    assert "Stripper Liquid Level" in result.stderr


def test_values_are_finite_and_match_the_published_normal_run(
    stepped_plant: tuple[TepPlant, list[PlantSample]],
) -> None:
    _, samples = stepped_plant
    assert [s.index for s in samples] == list(range(21))
    assert samples[-1].time_h == pytest.approx(1.0)
    for sample in samples:
        assert len(sample.values) == len(TAGS) == 53
        assert all(math.isfinite(v) for v in sample.values)
        assert sample.fault == 0
    for tag, (mean, sd) in D00_REFERENCE.items():
        ours = sum(s.value(tag) for s in samples) / len(samples)
        assert abs(ours - mean) < 3 * sd, (tag, ours, mean)


def test_units_agree_with_tep_studio() -> None:
    import tep_studio

    units = [unit for _, unit, _ in tep_studio.list_measurements()]
    units += [unit for _, unit, _ in tep_studio.list_manipulated_variables()][:11]
    assert [TAG_UNITS[tag] for tag in FEATURE_TAGS] == units


def test_bad_plant_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="mode"):
        TepPlant(seed=0, mode="mode9")
    with pytest.raises(ConfigError, match="control steps"):
        TepPlant(seed=0, sample_minutes=0.05)  # 3 s is not a multiple of 1.8 s


def test_missing_tep_studio_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tep_studio", None)  # makes `import tep_studio` fail
    with pytest.raises(SimulatorError, match=r"fedgate-bridge\[sim\]"):
        TepPlant(seed=0)


# -- the servers -----------------------------------------------------------------------


async def test_opcua_server_serves_every_tag_with_advancing_source_timestamps(
    stepped_plant: tuple[TepPlant, list[PlantSample]],
) -> None:
    _, samples = stepped_plant
    port = free_port()
    async with (
        PlantOpcUaServer(host="127.0.0.1", port=port, initial=samples[0]) as server,
        Client(server.endpoint) as client,
    ):
        index = await client.get_namespace_index(OPCUA_NAMESPACE_URI)
        assert index == server.namespace_index
        nodes = [client.get_node(opcua_node_id(tag, index)) for tag in TAGS]
        plant_object = client.get_node(f"ns={index};s=Plant")
        assert len(await plant_object.get_children()) == len(TAGS)

        stamps = []
        for sample, wall_time in ((samples[4], 1_700_000_000.0), (samples[5], 1_700_000_001.0)):
            await server.publish(sample, wall_time=wall_time)
            values = await client.read_values(nodes)
            assert values == list(sample.values)
            data_value = await nodes[6].read_data_value()  # XMEAS_7
            assert data_value.Value is not None
            assert data_value.Value.VariantType == ua.VariantType.Double
            stamps.append(data_value.SourceTimestamp)
        assert stamps == [
            datetime.fromtimestamp(1_700_000_000.0, UTC),
            datetime.fromtimestamp(1_700_000_001.0, UTC),
        ]


async def test_modbus_serves_the_values_at_the_bridge_config_addresses(
    stepped_plant: tuple[TepPlant, list[PlantSample]],
) -> None:
    _, samples = stepped_plant
    sample = PlantSample(
        index=7, time_h=0.35, values=(*samples[7].values[:52], 6.0), active_faults=(6,)
    )
    port = free_port()
    config = tomllib.loads(
        bridge_config_for(modbus_port=port, opcua_port=port + 1, topic_prefix="plant/site-9")
    )
    async with PlantModbusServer(host="127.0.0.1", port=port, initial=samples[0]) as server:
        await server.publish(sample, wall_time=time.time())
        client = AsyncModbusTcpClient("127.0.0.1", port=port)
        await client.connect()
        try:
            block = await client.read_holding_registers(
                0, count=HOLDING_REGISTER_COUNT, device_id=1
            )
            assert not block.isError()
            for entry in config["modbus"][0]["registers"]:
                address = entry["address"]
                decoded = client.convert_from_registers(
                    block.registers[address : address + 2],
                    data_type=client.DATATYPE.FLOAT32,
                    word_order=entry["word_order"],
                )
                assert decoded == as_float32(sample.value(entry["tag"])), entry["tag"]
            fault = await client.read_input_registers(0, count=1, device_id=1)
            assert fault.registers == [6]
            active = await client.read_discrete_inputs(0, count=1, device_id=1)
            assert active.bits[0] is True
            refused = await client.write_register(0, 1, device_id=1)
            assert refused.isError()
        finally:
            client.close()


def test_bridge_config_has_the_contract_keys() -> None:
    text = bridge_config_for(
        host="127.0.0.1",
        modbus_port=5020,
        opcua_port=4840,
        opcua_namespace_index=2,
        topic_prefix="plant/site-2",
        state_dir="/tmp/bridge-2",
        broker_port=1999,
        poll_interval_s=0.5,
    )
    config = tomllib.loads(text)
    assert {"state_dir", "topic_prefix", "log_level", "broker", "outbox"} <= config.keys()
    assert config["topic_prefix"] == "plant/site-2"
    assert config["broker"]["port"] == 1999
    assert set(config["broker"]) == {
        "host",
        "port",
        "client_id",
        "username",
        "password_file",
        "keepalive_s",
        "max_inflight",
    }
    assert config["broker"]["client_id"] == "fedgate-bridge-plant-site-2"
    assert set(config["outbox"]) == {"max_messages", "policy"}
    (modbus,) = config["modbus"]
    assert {
        "name",
        "transport",
        "host",
        "port",
        "serial_port",
        "baudrate",
        "parity",
        "stopbits",
        "bytesize",
        "unit",
        "poll_interval_s",
        "timeout_s",
        "registers",
    } == set(modbus)
    assert (modbus["transport"], modbus["port"], modbus["poll_interval_s"]) == ("tcp", 5020, 0.5)
    assert [r["tag"] for r in modbus["registers"]] == list(TAGS)
    assert [r["address"] for r in modbus["registers"]] == [s.address for s in holding_slots()]
    assert [r["address"] for r in modbus["registers"]] == list(range(0, 106, 2))
    for register in modbus["registers"]:
        assert set(register) == {
            "tag",
            "address",
            "kind",
            "type",
            "word_order",
            "scale",
            "offset",
            "unit",
        }
        assert (register["kind"], register["type"], register["word_order"]) == (
            "holding",
            "float32",
            "big",
        )
    (opcua,) = config["opcua"]
    assert opcua["endpoint"] == "opc.tcp://127.0.0.1:4840"
    assert opcua["mode"] == "subscribe"
    assert [n["node_id"] for n in opcua["nodes"]][:2] == ["ns=2;s=XMEAS_1", "ns=2;s=XMEAS_2"]
    assert {n["tag"]: n["unit"] for n in opcua["nodes"]}["XMEAS_7"] == "kPa gauge"
    assert parse_config(config).topic_prefix == "plant/site-2"  # the bridge's loader agrees
    only_opcua = tomllib.loads(bridge_config_for(opcua_port=4840))
    assert "modbus" not in only_opcua
    assert len(only_opcua["opcua"][0]["nodes"]) == 53


def test_float32_registers_put_the_high_word_first() -> None:
    assert float32_registers(1.0) == (0x3F80, 0x0000)
    assert float32_registers(-2.5) == (0xC020, 0x0000)


async def test_live_plant_paces_samples_into_its_sinks() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.received: list[tuple[int, float]] = []

        async def publish(self, sample: PlantSample, *, wall_time: float) -> None:
            self.received.append((sample.index, wall_time))

    recorder = Recorder()
    plant = TepPlant(seed=1, faults=[FaultSpec(2, 0.1)])
    live = LivePlant(plant, speed=1800.0, sinks=[recorder], hours=0.2)  # 0.1 s per sample
    summary = await live.run(asyncio.Event())
    assert [index for index, _ in recorder.received] == [0, 1, 2, 3, 4]
    assert summary.samples == 5
    assert summary.hours == pytest.approx(0.2)
    gaps = [b - a for (_, a), (_, b) in zip(recorder.received, recorder.received[1:], strict=False)]
    assert sum(gaps) >= 0.35  # four periods of 0.1 s, not as fast as possible
    assert plant.current.fault == 2


# -- the command -----------------------------------------------------------------------


# The installed console script, as a user runs it.
SIMULATE = [str(Path(sys.executable).with_name("fedgate-bridge")), "simulate"]


def run_simulate(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SIMULATE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_has_an_example_and_the_exit_codes() -> None:
    result = run_simulate("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: fedgate-bridge simulate")
    assert "Example" in result.stdout
    assert "fedgate-bridge simulate --plant tep" in result.stdout
    assert "Exit codes" in result.stdout


def test_usage_and_config_errors_exit_before_serving(tmp_path: Path) -> None:
    no_server = run_simulate("--seed", "1")
    assert no_server.returncode == SimulateExitCode.USAGE
    assert "--modbus-port" in no_server.stderr
    bad_fault = run_simulate("--modbus-port", str(free_port()), "--fault", "IDV99:1")
    assert bad_fault.returncode == SimulateExitCode.CONFIG
    assert "IDV 1..28" in bad_fault.stderr
    (tmp_path / "a-file").write_text("")
    bad_dir = run_simulate(
        "--modbus-port", str(free_port()), "--write-bridge-config", str(tmp_path / "a-file/b.toml")
    )
    assert bad_dir.returncode == SimulateExitCode.CONFIG
    assert "cannot create directory" in bad_dir.stderr
    bad_host = run_simulate("--modbus-port", str(free_port()), "--host", "not a host")
    assert bad_host.returncode == SimulateExitCode.USAGE
    assert "'not a host': it has a scheme, a path or spaces" in bad_host.stderr
    bad_fault = run_simulate("--modbus-port", str(free_port()), "--fault", "IDV99:1", "--json")
    assert json.loads(bad_fault.stdout)["exit_code"] == SimulateExitCode.CONFIG


@pytest.fixture
def simulate_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    modbus_port, opcua_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *SIMULATE,
            *("--seed", "2", "--fault", "IDV1:0.1", "--speed", "1800", "--json"),
            *("--modbus-port", str(modbus_port), "--opcua-port", str(opcua_port)),
            *("--write-bridge-config", str(tmp_path / "site-7" / "bridge.toml")),
            *("--topic-prefix", "plant/site-7", "--broker-port", "18830"),
            *("--bridge-state-dir", str(tmp_path / "state")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, process.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else "no output"
        yield process, json.loads(line)
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_simulate_serves_and_stops_on_sigterm(
    simulate_process: tuple[subprocess.Popen[str], dict[str, object]], tmp_path: Path
) -> None:
    process, started = simulate_process
    assert started["seed"] == 2
    assert started["sample_period_s"] == pytest.approx(0.1)
    modbus = started["modbus"]
    opcua = started["opcua"]
    assert isinstance(modbus, dict)
    assert isinstance(opcua, dict)
    # The bridge's own loader accepts what the simulator wrote.
    config = load_config(tmp_path / "site-7" / "bridge.toml")
    assert config.modbus[0].port == modbus["port"]
    assert config.opcua[0].endpoint == opcua["endpoint"]
    assert config.broker.port == 18830
    assert config.state_dir == str(tmp_path / "state")

    client = AsyncModbusTcpClient("127.0.0.1", port=int(modbus["port"]))
    assert await client.connect()
    try:
        faults: list[float] = []
        pressures: list[float] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(set(pressures)) < 3 or 1.0 not in faults):
            block = await client.read_holding_registers(0, count=106, device_id=1)
            values = client.convert_from_registers(
                block.registers, data_type=client.DATATYPE.FLOAT32
            )
            assert isinstance(values, list)
            pressures.append(values[6])
            faults.append(values[52])
            await asyncio.sleep(0.05)
    finally:
        client.close()
    assert len(set(pressures)) >= 3  # samples keep coming
    assert all(2600 < p < 2800 for p in pressures)
    assert 1.0 in faults  # IDV1 started at 0.1 simulated h

    async with Client(str(opcua["endpoint"])) as opc:
        node = opc.get_node(f"ns={opcua['namespace_index']};s=XMEAS_9")
        first = await node.read_data_value()
        await asyncio.sleep(0.5)
        second = await node.read_data_value()
    assert first.SourceTimestamp is not None
    assert second.SourceTimestamp is not None
    assert second.SourceTimestamp > first.SourceTimestamp
    assert second.Value is not None
    assert 119 < second.Value.Value < 122

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == SimulateExitCode.OK
    assert process.stderr is not None
    log = process.stderr.read()
    assert "simulator stopped" in log
    assert "reason=signal" in log
