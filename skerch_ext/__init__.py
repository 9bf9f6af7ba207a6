"""Sketched eigendecompositions of matrix-free operators, on top of skerch and curvlinops.

Random test matrices, the measurements and their distributed storage, the single- and two-pass
recoveries, a-posteriori error bounds, and the tolerances for comparing two runs. Nothing here
knows about the pipeline's run directories or configuration.
"""
