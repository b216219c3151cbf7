"""The gateway data path: live sources → durable buffer → training windows.

Modules (each small, named for what it does):

- :mod:`.samples` — the :class:`~.samples.Sample` every source produces and the buffer stores.
- :mod:`.buffer` — the crash-safe SQLite buffer (WAL, ``synchronous=FULL``,
  ``UNIQUE(source, seq)``), its size cap and counters.
- :mod:`.payloads` — strict decoding of JSON MQTT payloads into samples.
- :mod:`.sparkplug` — Sparkplug B payloads (protobuf, schema declared in code).
- :mod:`.mqtt_source` — MQTT ingestion: QoS 1 acknowledged only after the group commit.
- :mod:`.opcua_source` — OPC-UA subscriptions (asyncua), reconnecting.
- :mod:`.historian` — ``fedgate-agent import``: CSV / Parquet exports into the buffer.
- :mod:`.windows` — windows and labels over the buffer for training.
"""
