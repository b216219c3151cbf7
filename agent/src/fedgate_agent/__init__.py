"""fedgate-agent: trains on a gateway's local data and sends signed updates to its cloud."""

__version__ = "0.1.0"
