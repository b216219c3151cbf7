"""fedgate-bridge: PLC registers (Modbus) and OPC-UA nodes to MQTT.

The polling bridge and the plant simulator arrive with the gateway data-path work; this
distribution already installs alone and carries the command-line entry point.
"""

__version__ = "0.1.0"
