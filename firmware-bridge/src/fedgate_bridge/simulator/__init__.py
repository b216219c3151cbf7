"""A Tennessee Eastman plant served live over OPC-UA and Modbus (``fedgate-bridge simulate``).

Modules: :mod:`.tep_plant` steps the plant (no IO), :mod:`.live_plant` paces it against the
wall clock, :mod:`.opcua_server` and :mod:`.modbus_server` serve its tags,
:mod:`.register_map` fixes the tag order and addresses and writes a bridge configuration.
Only :mod:`.tep_plant` needs tep-studio (the ``sim`` extra), and only when a plant is built.
"""
