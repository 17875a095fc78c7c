"""Maintenance scripts (run as files: python tools/NAME.py)."""
