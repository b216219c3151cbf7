"""fedgate-coordinator: runs the rounds of one cloud and keeps their history."""

__version__ = "0.1.0"
