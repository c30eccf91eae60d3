"""prscd: one regional node of the presence mesh."""

__version__ = "0.1.0"
