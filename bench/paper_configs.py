"""Question 9: the paper's three cluster experiments as ``hessov plan`` prices them.

The paper's repository runs CIFAR-10 3c3d, CIFAR-100 All-CNN-C and ImageNet ResNet-18 on a
Slurm cluster (its scripts ``11a``-``11c``) and reports each phase's minutes (Fernandez et
al. 2025, "Connecting Parameter Magnitudes and Hessian Eigenspaces at Scale using Sketched
Methods", Figure 15). hessov ships the same settings as ``config/clusters/*_paper.yaml``.
This section plans each one and tabulates its jobs, array tasks, HVPs, memory per task and
disk, phase by phase, next to the paper's minutes.

A plan builds the problem once, to count D and to measure the gradient graph of one and two
examples. No CIFAR or ImageNet can be had here, so the data are synthetic files in the real
formats: CIFAR pickles of 50,000 + 10,000 random images, and an ImageNet image folder with
the real 1,000 classes but only the 5 small JPEGs per class and split that the 5,000-point
Hessian subsets need (a plan lists the files and decodes a few images; the index of the
real 1.28M names adds about 50 MB to every process). Nothing is timed: the costs are the plan's,
and the minutes on a GPU cluster come from running the configs there.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import numpy as np

from bench.common import HESSOV, ROOT, WORK, Settings, fmt_bytes, log, markdown_table
from bench.stages import write_synthetic_cifar

#: The configs, with the paper's minutes per phase (layout, HVPs, merge, QR, lstsq; total).
PAPER_MINUTES = {
    "cifar10_3c3d_paper": (4, 24, 3, 1.5, 2, 97),
    "cifar100_allcnnc_paper": (5, 100, 6, 2, 13, 126),
    "imagenet_resnet18_paper": (88, 8760, 38, 90, 610, 9586),
}
#: Images of the synthetic CIFAR files: the real datasets' sizes.
CIFAR_SIZES = {"train": 10_000, "test": 10_000}  # per train batch file (5 of them), and test
IMAGENET_CLASSES = 1000
#: Images per ImageNet class and split: what the paper's 5,000-point Hessian subsets take.
IMAGES_PER_CLASS = 5


def write_synthetic_cifar100(root: Path) -> None:
    """``root/cifar-100-python/{train,test}``: 50,000 and 10,000 random images, 100 classes."""
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", 50_000), ("test", 10_000)):
        batch = {
            b"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
            b"fine_labels": (np.arange(count) % 100).tolist(),
        }
        with open(directory / name, "wb") as handle:
            pickle.dump(batch, handle)


def write_synthetic_imagenet(root: Path) -> None:
    """``root/imagenet/{train,val}/nXXXXXXXX/``: five 64x48 JPEGs per class and split."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for split in ("train", "val"):
        for label in range(IMAGENET_CLASSES):
            folder = root / "imagenet" / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(IMAGES_PER_CLASS):
                Image.fromarray(pixels).save(folder / f"n{label:08d}_{index}.JPEG")


def write_synthetic_datasets(root: Path) -> Path:
    """CIFAR-10, CIFAR-100 and ImageNet under ``root``; returns it, to use as
    ``OBS_DATASETS``.
    """
    write_synthetic_cifar(root, CIFAR_SIZES)
    write_synthetic_cifar100(root)
    write_synthetic_imagenet(root)
    return root


def plan(config: str, data: Path) -> dict:
    """``hessov plan --json`` of ``config/clusters/CONFIG.yaml`` on the synthetic data, with
    ``backend=slurm`` so that every job is held to its stage's ``slurm`` memory.
    """
    path = ROOT / "config" / "clusters" / f"{config}.yaml"
    out = subprocess.run(
        [HESSOV, "plan", str(path), f"OBS_DATASETS={data}", "backend=slurm", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


#: The paper's phases and the hessov stages that do their work.
PHASES = (
    ("layout", ("layout",)),
    ("HVPs", ("measure",)),
    ("QR + lstsq (basis, solve)", ("basis", "solve")),
    ("analysis", ("analyze",)),
)


def sketch_jobs(planned: dict) -> list[dict]:
    """The jobs of one Hessian: the layout, and those of the first sketch (step and split)."""
    step, split = planned["sketches"][0]
    marker = f"step={step} split={split}"
    return [job for job in planned["jobs"] if job["stage"] == "layout" or marker in job["name"]]


def phase_row(jobs: list[dict], stages: tuple[str, ...]) -> list[str]:
    """Jobs (array tasks), HVPs, the largest task's memory and the disk of ``stages``."""
    jobs = [job for job in jobs if job["stage"] in stages]
    tasks = sum(len(job["tasks"]) if job["tasks"] else 1 for job in jobs)
    return [
        f"{len(jobs)} ({tasks})",
        f"{sum(job['hvps'] for job in jobs):,}",
        fmt_bytes(max(job["memory_bytes"] for job in jobs)),
        fmt_bytes(sum(job["disk_bytes"] for job in jobs)),
    ]


def config_table(name: str, planned: dict) -> str:
    """One config's settings and totals, and its table of phases for one Hessian."""
    minutes = PAPER_MINUTES[name]
    paper = {
        "layout": f"{minutes[0]:,}",
        "HVPs": f"{minutes[1]:,}",
        "QR + lstsq (basis, solve)": f"{minutes[3]:,} + {minutes[4]:,} (merge {minutes[2]:,})",
        "analysis": "-",
    }
    jobs = sketch_jobs(planned)
    rows = [[phase, *phase_row(jobs, stages), paper[phase]] for phase, stages in PHASES]
    blocks = planned["row_block"]
    solve = f"row blocks of {blocks:,} rows" if blocks > 0 else "in memory"
    head = (
        f"**`config/clusters/{name}.yaml`**: D = {planned['dim']:,}, k = {planned['k']:,}, "
        f"s = {planned['s']:,}, {planned['tasks']} measure tasks per Hessian, basis and solve "
        f"{solve}. The whole config, {len(planned['sketches'])} Hessians (steps x splits) and "
        f"{len(planned['jobs'])} jobs: {planned['hvps']:,} HVPs, "
        f"{fmt_bytes(planned['disk_bytes'])} of disk, at most "
        f"{fmt_bytes(planned['peak_memory_bytes'])} per task. One Hessian (step "
        f"{planned['sketches'][0][0]}, {planned['sketches'][0][1]} split), against the paper's "
        f"{minutes[5]:,} minutes per Hessian:"
    )
    headers = ["phase", "jobs (tasks)", "HVPs", "memory per task", "disk", "paper (minutes)"]
    return head + "\n\n" + markdown_table(headers, rows)


def section(settings: Settings) -> str:
    """Question 9: the three configs planned, one table each."""
    data = write_synthetic_datasets(WORK / "paper_data")
    parts = []
    for name in PAPER_MINUTES:
        log(f"plan {name}")
        parts.append(config_table(name, plan(name, data)))
    return "## 9. The paper's cluster experiments, planned\n\n" + "\n\n".join(
        [__doc__.split("\n\n")[1].replace("\n", " "), *parts]
    )
