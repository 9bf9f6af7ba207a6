"""The choices the sketch library accepts, importable without torch.

The recoveries of :func:`hessov.skerch_ext.incore.sketched_eigh` and the test-matrix types of
:mod:`hessov.skerch_ext.random_matrices` are defined here, once, so that configuration validation
(``hessov.config``, imported by every command) can check them without importing torch.
"""

#: How eigenpairs are recovered from the sketch: SEIGH's single pass (``s`` HVPs) or the
#: two-pass block-Krylov Rayleigh-Ritz (``2k`` HVPs in two rounds).
RECOVERIES = ("single_pass", "two_pass")

#: Test-matrix types: the scrambled subsampled real trigonometric transform, or i.i.d.
#: Gaussian or Rademacher entries.
NOISE_TYPES = ("ssrft", "gaussian", "rademacher")
