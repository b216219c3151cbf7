"""The simulated plant's tags served by a Modbus TCP server (pymodbus).

Layout (see :mod:`.register_map`): every tag a float32 in two holding registers, high word
first, at addresses 0, 2, 4, ... in :data:`~.register_map.TAGS` order; FAULT also as a
uint16 in input register 0 and as discrete input 0 (fault active). Nothing is writable:
writes are answered with ILLEGAL ADDRESS.

pymodbus' device model keeps its own register list; an access hook copies the latest
sample into it on each read, so a read of 106 holding registers always returns one
consistent sample (publish and read run on the same event loop).
"""

from __future__ import annotations

from types import TracebackType

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from fedgate_bridge.errors import SimulatorError
from fedgate_bridge.simulator.register_map import (
    FAULT_DISCRETE_INPUT,
    FAULT_INPUT_REGISTER,
    TAGS,
    holding_image,
)
from fedgate_bridge.simulator.tep_plant import PlantSample

__all__ = ["PlantModbusServer"]

_READ_COILS = 1
_READ_DISCRETE_INPUTS = 2
_READ_HOLDING_REGISTERS = 3
_READ_INPUT_REGISTERS = 4


class PlantModbusServer:
    """A Modbus TCP server holding the plant's latest sample; answers every unit id.

    Use as ``async with PlantModbusServer(host=..., port=..., initial=sample):``;
    :meth:`publish` replaces the served sample.
    """

    def __init__(self, *, host: str, port: int, initial: PlantSample) -> None:
        self.host = host
        self.port = port
        self._holding = holding_image(initial.values)
        self._fault = initial.fault
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        """Listen on ``host:port``. Raises :class:`SimulatorError`."""
        device = SimDevice(
            id=0,  # 0: answer every unit id
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],  # coils: none used
                [SimData(FAULT_DISCRETE_INPUT, values=False, datatype=DataType.BITS)],
                [
                    SimData(
                        0,
                        values=[0.0] * len(TAGS),
                        datatype=DataType.FLOAT32,
                        readonly=True,
                    )
                ],
                [SimData(FAULT_INPUT_REGISTER, values=0, datatype=DataType.UINT16, readonly=True)],
            ),
            action=self._refresh,
        )
        server = ModbusTcpServer(device, address=(self.host, self.port))
        try:
            await server.serve_forever(background=True)
        except (RuntimeError, OSError) as exc:
            raise SimulatorError(
                f"cannot serve Modbus TCP on {self.host}:{self.port}: {exc} (is the port in use?)"
            ) from exc
        self._server = server

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]

    async def publish(self, sample: PlantSample, *, wall_time: float) -> None:
        """Serve ``sample`` from now on (``wall_time`` is unused: Modbus has no timestamps)."""
        self._holding = holding_image(sample.values)
        self._fault = sample.fault

    async def _refresh(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        # pymodbus calls this with the live register list of the block being accessed.
        if set_values is not None:
            return ExcCodes.ILLEGAL_ADDRESS
        if function_code == _READ_HOLDING_REGISTERS:
            registers[: len(self._holding)] = self._holding
        elif function_code == _READ_INPUT_REGISTERS:
            registers[FAULT_INPUT_REGISTER - start_address] = self._fault
        elif function_code == _READ_DISCRETE_INPUTS:
            # Bits are packed 16 per register, bit 0 in the least significant bit.
            registers[0] = 1 if self._fault else 0
        elif function_code == _READ_COILS:
            registers[0] = 0
        return None

    async def __aenter__(self) -> PlantModbusServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
