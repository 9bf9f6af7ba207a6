"""One module per stage of the pipeline; stages never import each other.

Each stage reads its inputs from the run directory and writes its outputs there, so that it can
run alone on any machine that sees the directory. :mod:`hessov.jobs` holds their entry points.
"""
