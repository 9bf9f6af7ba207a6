"""Metrics, figures and reports of a run, and the noisy quadratic model.

Subspace overlaps and Grassmannian metrics (:mod:`hessov.analysis.subspaces`), the figures
and reports of the analyze and compare stages, and the closed-form noisy quadratic model
(:mod:`hessov.analysis.nqm`).
"""
