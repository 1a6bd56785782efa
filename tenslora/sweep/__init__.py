"""Sweeps: expand a YAML grid into ``tenslora train`` jobs, run them (locally or on Ray), report results.

Modules: ``spec`` (sweep files, job names), ``store`` (SQLite state), ``gpus`` (NVML, placement),
``runner`` (per-job wrapper process), ``local`` / ``ray_backend`` (schedulers), ``report`` (aggregation).
This package module imports nothing heavy; import the sub-modules you need.
"""
