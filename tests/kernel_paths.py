"""The CPU kernel paths the tests mix, named once: environment settings that change the last
bits of torch's and MKL's float32 products on an x86-64 CPU without changing the maths.

- ``ATEN_CPU_CAPABILITY=default``: torch's own vectorised kernels (and its matmul dispatch)
  without AVX2/AVX-512, on every x86 CPU that has them;
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional-numerical-reproducibility branch for any
  x86-64, which rounds differently from the CPU-specific branch it takes by default;
- ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL's AVX2 code on a CPU with AVX-512 (the path an AMD
  CPU takes, where MKL never uses AVX-512; elsewhere it changes nothing).

.ci/run reruns the kernel-path-sensitive tests under the same settings.
"""

from __future__ import annotations

import os

import torch

#: The variables that choose a kernel path; each setting below is relative to none of them.
VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")

DEFAULT: dict[str, str] = {}
ATEN_DEFAULT = {"ATEN_CPU_CAPABILITY": "default"}
MKL_COMPATIBLE = {"MKL_CBWR": "COMPATIBLE"}
MKL_AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}

#: One setting per array task of a three-task round, rotated between rounds.
MIXED = (DEFAULT, ATEN_DEFAULT, MKL_COMPATIBLE)


def current() -> dict[str, str]:
    """The kernel-path variables this process runs under (CI's reruns set one)."""
    return {key: os.environ[key] for key in VARIABLES if key in os.environ}


def on_path(env: dict[str, str], setting: dict[str, str]) -> dict[str, str]:
    """``env`` on kernel path ``setting`` exactly: any kernel-path variable ``env`` carries
    (CI reruns the suite under one) is dropped first.
    """
    return {**{key: value for key, value in env.items() if key not in VARIABLES}, **setting}


def torch_has_vector_kernels() -> bool:
    """Whether ``ATEN_CPU_CAPABILITY=default`` changes anything on this CPU."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def setting_of(task: int, round_number: int) -> dict[str, str]:
    """The kernel path of array task ``task`` in round ``round_number`` (0-based)."""
    return MIXED[(task + round_number) % len(MIXED)]
