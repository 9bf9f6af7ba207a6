"""Benchmarks of hessov: scripts, not tests (``.venv/bin/python -m bench.<name> --write``).

Results and the machine they ran on are in ``bench/RESULTS.md``.
"""
