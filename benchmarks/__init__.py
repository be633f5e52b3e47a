"""Measurements beside the library (not installed): the kernel-level peer benchmark (peers.py)."""
