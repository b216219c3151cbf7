"""Several clouds on one machine: a Mosquitto per cloud, a coordinator per cloud (real CLI
processes), and scripted agents that answer each round with plaintext updates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import nacl.signing
import numpy as np
from fedgate_common.arrays import encode_arrays
from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.keys import public_key_text
from fedgate_common.messages import ModelUpdate, RoundStart
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import coordinator_broadcast_filter, round_topic

from tests.net_support import free_port, wait_for_port

BIN = Path(sys.executable).parent
MOSQUITTO = "/usr/sbin/mosquitto"
SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)


@contextlib.contextmanager
def brokers(directory: Path, count: int) -> Iterator[list[int]]:
    """``count`` private Mosquitto brokers on free loopback ports."""
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for index in range(count):
            port = free_port()
            conf = directory / f"mosquitto-{index}.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
            processes.append(
                subprocess.Popen(
                    [MOSQUITTO, "-c", str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            wait_for_port(port, process=process)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


@dataclass
class Cloud:
    name: str
    state: Path
    port: int
    public_key: str
    agents: dict[str, nacl.signing.SigningKey]
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def coordinator(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli("fedgate-coordinator", "--state-dir", str(self.state), *args, check=check)

    def serve(self, heights: int, *, script: Path | None = None) -> None:
        command = (
            [sys.executable, str(script), str(self.state), str(heights)]
            if script
            else [
                str(BIN / "fedgate-coordinator"),
                "--state-dir",
                str(self.state),
                "serve",
                "--until-height",
                str(heights),
            ]
        )
        self.process = subprocess.Popen(
            command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.coordinator("status", "--json").stdout)
        return data

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


def make_federation(
    directory: Path,
    ports: list[int],
    *,
    agents_per_cloud: int = 3,
    consensus: dict[str, Any] | None = None,
    update_timeout: float = 20.0,
) -> tuple[str, list[Cloud]]:
    """Initialise one coordinator per broker, join them in one signed manifest, enroll
    ``agents_per_cloud`` scripted agents in each. Returns the deployment and the clouds."""
    deployment = f"fed-{secrets.token_hex(4)}"
    spec_file = directory / "spec.json"
    spec_file.write_bytes(msgspec.json.encode(SPEC))
    clouds: list[Cloud] = []
    for index, port in enumerate(ports):
        name = f"c{index + 1}"
        state = directory / name
        init = json.loads(
            cli(
                "fedgate-coordinator",
                "--state-dir",
                str(state),
                "init",
                "--cloud",
                name,
                "--deployment",
                deployment,
                "--broker-port",
                str(port),
                "--min-participants",
                "2",
                "--update-timeout",
                str(update_timeout),
                "--model-spec",
                str(spec_file),
                "--aggregation",
                "plaintext",
                "--json",
            ).stdout
        )
        keys = {
            f"{name}-gw{i}": nacl.signing.SigningKey.generate() for i in range(agents_per_cloud)
        }
        clouds.append(
            Cloud(
                name=name,
                state=state,
                port=port,
                public_key=init["coordinator_public_key"],
                agents=keys,
                log=directory / f"{name}.log",
            )
        )
        for agent, key in keys.items():
            cli(
                "fedgate-coordinator",
                "--state-dir",
                str(state),
                "enroll",
                agent,
                public_key_text(key.verify_key),
            )
        # The scripted agents send plaintext updates; real agents refuse them by default.
    manifest = directory / "federation.json"
    entries = [f"--cloud={c.name}={c.public_key}@127.0.0.1:{c.port}" for c in clouds]
    clouds[0].coordinator("federation", "init", *entries, "--out", str(manifest))
    if consensus:
        data = json.loads(manifest.read_text())
        data["manifest"]["consensus"].update(consensus)
        manifest.write_text(json.dumps(data))
    for cloud in clouds:
        cloud.coordinator("federation", "sign", str(manifest))
    for cloud in clouds:
        cloud.coordinator("federation", "install", str(manifest), "--replace")
    return deployment, clouds


class ScriptedAgents:
    """Each cloud's agents: answer every round start of that cloud with small updates."""

    def __init__(self, deployment: str, clouds: list[Cloud]) -> None:
        self.deployment = deployment
        self.clouds = clouds
        self.answered: dict[str, list[int]] = {c.name: [] for c in clouds}
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> ScriptedAgents:
        ready = [asyncio.Event() for _ in self.clouds]
        self._tasks = [
            asyncio.create_task(self._serve(cloud, event))
            for cloud, event in zip(self.clouds, ready, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_until_done(self._tasks)

    async def _serve(self, cloud: Cloud, ready: asyncio.Event) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", cloud.port) as client:
                    await client.subscribe(
                        coordinator_broadcast_filter(self.deployment, cloud.name), qos=1
                    )
                    ready.set()
                    async for message in client.messages:
                        raw = message.payload
                        if not isinstance(raw, bytes) or not raw:
                            continue
                        payload = decode_payload(open_envelope(raw))
                        if isinstance(payload, RoundStart):
                            if payload.round in self.answered[cloud.name]:
                                continue
                            self.answered[cloud.name].append(payload.round)
                            await self._answer(client, cloud, payload)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    async def _answer(self, client: aiomqtt.Client, cloud: Cloud, start: RoundStart) -> None:
        rng = np.random.default_rng([start.round, int(cloud.name[1:])])
        for agent, key in cloud.agents.items():
            delta = {
                n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in parameter_shapes(SPEC)
            }
            update = ModelUpdate(
                round=start.round,
                base_digest=start.base_digest,
                delta=encode_arrays(delta),
                num_samples=10,
                train_loss=0.5,
            )
            raw = seal(
                update, signing_key=key, deployment=self.deployment, cloud=cloud.name, sender=agent
            )
            await client.publish(
                round_topic(self.deployment, cloud.name, start.round, "update", agent), raw, qos=1
            )


def decisions(cloud: Cloud) -> dict[int, str]:
    """height → decided model digest, from the cloud's own store (SQLite file)."""
    from fedgate_coordinator.store import Store

    url = f"sqlite:///{cloud.state / 'coordinator.db'}"
    with Store.open(url, migrate=False) as store:
        return {d.height: d.value for d in store.decisions()}


class Budget:
    """One deadline for all of a test's waits, inside pytest's own timeout (300 s).

    A federation that stalls is then reported by the wait that noticed, with each cloud's
    state and log, instead of being killed by pytest-timeout with nothing printed.
    """

    def __init__(self, seconds: float = 270.0) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """At most ``cap`` seconds, and never past the deadline."""
        return max(0.0, min(cap, self.deadline - time.monotonic()))


def describe(clouds: list[Cloud], *, skip_exited_ok: bool = False) -> list[str]:
    """Each cloud's exit code or "running", the heights it decided, and its log's tail."""
    reports = []
    for cloud in clouds:
        code = cloud.process.poll() if cloud.process is not None else None
        if code == 0 and skip_exited_ok:
            continue
        heights = sorted(decisions(cloud))
        tail = "\n".join(cloud.log.read_text(errors="replace").splitlines()[-25:])
        if cloud.process is None:
            state = "not running"
        else:
            state = "running" if code is None else f"exited {code}"
        reports.append(f"--- {cloud.name}: {state}, decided heights {heights}\n{tail}")
    return reports


async def wait_for_exit(clouds: list[Cloud], seconds: float) -> None:
    """Every cloud's coordinator exits 0 within ``seconds`` (one deadline for all).

    On a timeout or a failed exit the error describes each cloud that did not exit 0. A
    federation that stalls then says where.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(c.process is not None for c in clouds):
        codes = [c.process.poll() for c in clouds if c.process is not None]
        if any(code not in (None, 0) for code in codes) or all(code == 0 for code in codes):
            break
        await asyncio.sleep(0.5)
    reports = describe(clouds, skip_exited_ok=True)
    if reports:
        raise AssertionError(
            f"not every coordinator exited 0 within {seconds:.0f} s:\n" + "\n".join(reports)
        )


async def wait_until(
    predicate: Any, seconds: float, what: str, clouds: list[Cloud] | None = None
) -> None:
    """Poll ``predicate``; on a timeout, describe ``clouds`` too."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.5)
    reports = describe(clouds) if clouds else []
    raise AssertionError(
        f"timed out after {seconds:.0f} s waiting for {what}\n" + "\n".join(reports)
    )


def proposer(clouds: list[Cloud], height: int, round: int = 0) -> Cloud:
    return clouds[(height + round) % len(clouds)]
