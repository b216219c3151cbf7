"""Cross-cloud consensus (DESIGN.md §5): the federation manifest, Tendermint's algorithm as
an IO-free state machine, and commit certificates.

Nothing here does IO; the coordinator's driver owns timers, MQTT and the vote journal.
"""
