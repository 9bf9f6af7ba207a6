"""Benchmarks of hessov: scripts, not tests. ``make bench`` (``.venv/bin/python -m bench``)
answers the benchmark questions in one run and writes ``bench/RESULTS.md``, with the machine
and versions it ran on; see :mod:`bench.__main__` for the sections and options.
"""
