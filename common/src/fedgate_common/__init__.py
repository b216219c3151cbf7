"""fedgate-common: the wire protocol shared by agents, coordinators and the bridge.

Nothing in this package does IO: no sockets, files, clocks or global randomness.
"""

__version__ = "0.1.0"
