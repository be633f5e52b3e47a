"""Measurements beside the library (not installed; run from a checkout): the kernel-level peer benchmark
(peers.py), the end-to-end training step (e2e.py), the longest trainable sequence (context.py), their shared
workload with the peers and profiling (workload.py) and reports (report.py, step_profile.py)."""
