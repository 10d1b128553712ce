"""Checkpoint tooling: ``kd-convert`` and the conversions behind it (see tools/README.md)."""
