"""What every job of a run costs before it runs: HVPs, peak memory per task and disk.

A sketch at scale fails late and expensively when nothing prices it: ``k`` = 5% of D on the
1.3M-parameter mnist_mlp would hold ``D x 2k`` float32 (714 GB) in one solve. ``hessov
plan``, ``run`` and ``resume`` price every job of the stage graph with the model below and
refuse, before anything is submitted, a job whose peak memory exceeds its budget, naming the
keys that would make it fit.

**Memory model** (bytes, one process). Every process pays :data:`PROCESS_FLOOR_BYTES` (the
interpreter with torch and h5py imported after one autograd call: 277 MiB measured in
bench/RESULTS.md, section 5). A process that builds the problem adds its data and the model.
The rest is what the stage holds, counted as ``D``-row matrices of the storage dtype:

* every process that builds the problem: the examples it takes out of the splits, at
  :attr:`ProblemFacts.example_bytes` each (a training batch, the Hessian subset, for inputs
  read on demand an evaluation's chunk);
* measure: the kept gradient graph of one batch of Hessian points (measured once per
  problem by :func:`problem_facts` with ``saved_tensors_hooks``: a constant part and a part
  per example), which a block's batched second backward pass holds ``1 + block`` times over,
  plus :data:`MEASURE_BLOCK_COPIES` ``D x block`` columns (test columns, products, the float64
  probes of the a-posteriori round and their copies);
* basis and solve in memory: :data:`IN_MEMORY_COPIES` ``D x k`` matrices for two rounds,
  half as many more per further round (merged round,
  ``Q``, residual, ``P`` twice, ``[Q, P]``, ``W``);
* basis and solve in row blocks (:mod:`hessov.rowpass`), per phase: a per-block phase
  holds :data:`ROW_BLOCK_COPIES` ``row_block x k`` blocks; a combined one a group of
  ``fan_in`` TSQR factors ``k x k`` at a time (the tree's levels go to disk) and the
  ``2k x 2k`` core's ``eigh``, ``O(k^2)`` whatever ``D``; single pass's ``ritz`` also
  ``D x block_size`` columns of ``Q``.

bench/RESULTS.md (question 8) compares these estimates with each stage's measured peak RSS:
at D = 10^7, k = 256 every task's RSS was 0.82-0.87 of its estimate.

**Budgets.** ``memory_gb`` (> 0) sets every job's budget. Otherwise a local run has this
machine's memory and a Slurm job its stage's ``slurm.stages.STAGE.mem_gb`` or ``slurm.mem_gb``
(the machine's memory when neither is set).

**The default k** (:func:`default_k`): the paper's choices, 5% of D for small networks
(k = 352 on the 7,030-parameter mnist_mini), k = 1,000 at D = 895,210 (CIFAR-10 3c3d) and
k = 1,500 at D = 11,689,512 (ImageNet ResNet-18): 5% of D up to 1,000, then growing as
``D^0.158``, the power through the paper's two large settings. A sketch's HVPs cost ``O(D)``
each, so a k growing like D would make the sketch's cost quadratic in D; the top of the
spectrum that training feels holds a number of outliers that grows slowly with the network.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from hessov.analysis.rowblocks import DEFAULT_BUDGET_BYTES
from hessov.config import RunConfig
from hessov.errors import ConfigError
from hessov.merge import CHUNK_ROWS
from hessov.skerch_ext.rowblocks import DEFAULT_FAN_IN
from hessov.training import EVAL_CHUNK

MIB, GIB = 2**20, 2**30
#: Interpreter, torch, h5py and one autograd call (bench/RESULTS.md, section 5: 277 MiB).
PROCESS_FLOOR_BYTES = 300 * MIB
#: ``D x block`` columns a measure task holds at once.
MEASURE_BLOCK_COPIES = 6
#: ``D x k`` matrices held at once by the in-memory basis and solve.
IN_MEMORY_COPIES = 8
#: ``row_block x k`` blocks held at once by the out-of-core basis and solve.
ROW_BLOCK_COPIES = 8
#: Row blocks are multiples of the tall datasets' chunk rows.
ROW_BLOCK_ALIGN = CHUNK_ROWS
#: The paper's two large settings, through which the default k grows beyond 1,000.
PAPER_K = ((895_210, 1000), (11_689_512, 1500))
SMALL_K_FRACTION, LARGE_K_START = 0.05, 1000


def default_k(dim: int) -> int:
    """The default number of outer measurements at ``D = dim`` (see the module docstring)."""
    (d0, k0), (d1, k1) = PAPER_K
    exponent = math.log(k1 / k0) / math.log(d1 / d0)
    grown = LARGE_K_START * max(1.0, dim / d0) ** exponent
    return max(1, min(round(SMALL_K_FRACTION * dim), round(grown)))


@dataclass(frozen=True)
class ProblemFacts:
    """What the memory of a process that builds the problem depends on.

    Attributes:
        dim: D, trainable parameters.
        data_bytes: The problem's train and test tensors held in memory, which every such
            process loads (nothing for inputs read on demand, :class:`hessov.batching.LazyRows`).
        graph_bytes: Saved tensors of one gradient graph kept for double backward that do
            not grow with the batch (weights and the like).
        graph_bytes_per_example: Saved tensors per example of that graph.
        example_bytes: One example's inputs in memory: what a taken subset (a batch, the
            Hessian subset) costs per example.
        lazy_inputs: Whether the inputs are read on demand, so that an evaluation holds its
            chunk of examples too.
        train_examples: Examples in the train split (what a full batch takes).
    """

    dim: int
    data_bytes: int
    graph_bytes: int
    graph_bytes_per_example: int
    example_bytes: int = 0
    lazy_inputs: bool = False
    train_examples: int = 0


def _saved_bytes(problem, count: int) -> int:
    """Bytes autograd saves for the double-backward graph of the first ``count`` examples, in
    eval mode as every Hessian is taken (batch norm would refuse one example in training).
    """
    from hessov.batching import batch_loss, chunk

    sizes = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    model, training = problem.model, problem.model.training
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            inputs = chunk(problem.train.inputs, 0, count)
            loss = batch_loss(model, problem.loss, inputs, problem.train.targets[:count])
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    finally:
        model.train(training)
    return sum(sizes)


def problem_facts(problem) -> ProblemFacts:
    """Measure :class:`ProblemFacts` of a built problem: the graphs of one and two examples
    give the constant part and the part per example.
    """
    from hessov.batching import LazyRows, example_bytes, resident_bytes, tensors

    splits = (problem.train, problem.test)
    data = sum(resident_bytes(s.inputs) + resident_bytes(s.targets) for s in splits)
    one, two = _saved_bytes(problem, 1), _saved_bytes(problem, 2)
    return ProblemFacts(
        problem.num_params,
        data,
        max(0, 2 * one - two),
        max(0, two - one),
        max(example_bytes(s.inputs) + example_bytes(s.targets) for s in splits),
        any(isinstance(t, LazyRows) for s in splits for t in tensors(s.inputs)),
        len(problem.train),
    )


def machine_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(cfg: RunConfig, stage: str) -> tuple[int, str]:
    """A job's memory budget in bytes and the key that sets it."""
    if cfg.memory_gb > 0:
        return int(cfg.memory_gb * GIB), "memory_gb"
    if cfg.backend == "slurm":
        override = getattr(cfg.slurm.stages, stage, None)
        if override is not None and override.mem_gb:
            return override.mem_gb * GIB, f"slurm.stages.{stage}.mem_gb"
        if cfg.slurm.mem_gb:
            return cfg.slurm.mem_gb * GIB, "slurm.mem_gb"
    return machine_memory_bytes(), "memory_gb (0: this machine's memory)"


def _itemsize(spec) -> int:
    return torch.empty(0, dtype=getattr(torch, spec.layout.dtype)).element_size()


def _round_factor(spec) -> float:
    """How many times two rounds' ``D x k`` matrices the basis and solve hold: ``V`` and
    ``H V`` grow by ``k`` columns a round (:mod:`hessov.krylovspace`).
    """
    return spec.krylov_rounds / 2 if spec.recovery == "two_pass" else 1.0


def in_memory_solve_bytes(spec) -> int:
    """Peak memory of the in-memory basis or solve (the larger, the solve)."""
    dim, k, inner = spec.layout.dim, spec.layout.num_outer, spec.layout.num_inner
    size = _itemsize(spec)
    probes = 2 * dim * spec.num_apost * 8  # the probes in float64 and their products
    matrices = int(IN_MEMORY_COPIES * _round_factor(spec) * dim * k * size)
    return PROCESS_FLOOR_BYTES + matrices + probes + 3 * inner**2 * size


def row_block_solve_bytes(spec, row_block: int) -> int:
    """Peak memory of the out-of-core basis or solve with ``row_block`` rows per block: a
    bound on every phase's job (:func:`row_phase_bytes`), as if one process ran them all.
    """
    return PROCESS_FLOOR_BYTES + sum(_row_phase_parts(spec, row_block).values())


def _row_phase_parts(spec, row_block: int) -> dict[str, int]:
    """What the row-block phases hold beside the process: a block's rows (per-block
    phases); a group of the TSQR tree, the Ritz core and the blocks' checksums (combined
    phases, which read the blocks' small results one at a time); and single pass's
    ``D x block_size`` columns of ``Q`` for ``Psi Q`` and ``Omega^T Q``.
    """
    dim, k, inner = spec.layout.dim, spec.layout.num_outer, spec.layout.num_inner
    size = _itemsize(spec)
    blocks = -(-dim // row_block)
    core = _core_bytes(spec)
    tree = 3 * DEFAULT_FAN_IN * k * k * 8  # a group of R_i stacked, its Q and its pieces
    rows = int(ROW_BLOCK_COPIES * _round_factor(spec) * row_block * k * size)
    return {
        "rows": rows + 2 * row_block * spec.num_apost * 8,
        "small": tree + core + blocks * k * 8,  # and every block's column checksums
        "columns": (4 * dim * spec.layout.block_size * size + 3 * inner**2 * size) if inner else 0,
    }


def _core_bytes(spec) -> int:
    """The extended core ``(q k, q k)`` in float64, with its ``eigh``'s copies."""
    width = spec.layout.num_outer * max(2, int(2 * _round_factor(spec)))
    return 4 * width**2 * 8


def row_phase_bytes(spec, phase) -> int:
    """Peak memory of one phase's job (:class:`hessov.rowpass.Phase`) of the row-block
    basis or solve: a block's rows and the Ritz coefficients for a per-block
    phase; a tree group, the core and the checksums for a combined one (single pass's
    ``ritz`` with the columns of ``Q``; ``finish`` with a block it copies).
    """
    parts = _row_phase_parts(spec, spec.row_block)
    if phase.per_block:
        return PROCESS_FLOOR_BYTES + parts["rows"] + _core_bytes(spec)
    if phase.name == "finish":  # copies Q's or W's blocks into the basis or eigen file
        return PROCESS_FLOOR_BYTES + parts["rows"] + parts["small"]
    columns = parts["columns"] if phase.name == "ritz" else 0
    return PROCESS_FLOOR_BYTES + parts["small"] + columns


#: Overrides that choose the row block of a laid-out run again.
ROW_BLOCK_KEYS = ("row_block", "memory_gb")


def rechoose_row_block(cfg: RunConfig, spec, overrides) -> bool:
    """Choose ``spec.row_block`` again when ``overrides`` (``KEY=VALUE``) set ``row_block`` or
    ``memory_gb`` (already applied to ``cfg``): a new budget alone chooses automatically,
    whatever row block the run's config saved. Returns whether it was chosen again.
    """
    keys = {item.split("=", 1)[0] for item in overrides}
    if not keys & set(ROW_BLOCK_KEYS):
        return False
    if "row_block" not in keys:
        cfg.row_block = 0
    spec.row_block = choose_row_block(cfg, spec)
    return True


def choose_row_block(cfg: RunConfig, spec) -> int:
    """The layout's ``row_block``: 0 (in memory) when the in-memory solve fits the budget of
    the basis and solve jobs, else the largest multiple of :data:`ROW_BLOCK_ALIGN` rows whose
    out-of-core solve fits half of it (``cfg.row_block`` > 0 fixes it; -1 forces memory).
    """
    k = spec.layout.num_outer
    if cfg.row_block == -1:
        return 0
    if cfg.row_block > 0:
        if cfg.row_block < k:
            raise ConfigError(f"row_block: {cfg.row_block} rows is fewer than k={k}")
        if spec.recovery == "two_pass" and spec.krylov_rounds * k > spec.layout.dim:
            raise ConfigError(
                f"row_block: two-pass recovery in row blocks needs rounds x k <= D "
                f"({spec.krylov_rounds} x {k}, D={spec.layout.dim}); use row_block=-1 "
                "(in memory)"
            )
        return min(cfg.row_block, spec.layout.dim)
    budget = min(memory_budget(cfg, stage)[0] for stage in ("basis", "solve"))
    if in_memory_solve_bytes(spec) <= budget or max(2, spec.krylov_rounds) * k > spec.layout.dim:
        return 0
    # Half the budget: the estimate's margin, and page cache for the passes' reads. Blocks
    # larger than that gain nothing: a pass streams through them either way.
    budget //= 2
    # The largest aligned block that fits (memory grows with the block), by bisection.
    low, high = -(-k // ROW_BLOCK_ALIGN), -(-spec.layout.dim // ROW_BLOCK_ALIGN)
    while low < high:
        middle = (low + high + 1) // 2
        if row_block_solve_bytes(spec, middle * ROW_BLOCK_ALIGN) <= budget:
            low = middle
        else:
            high = middle - 1
    return min(low * ROW_BLOCK_ALIGN, spec.layout.dim)


@dataclass(frozen=True)
class JobCost:
    """A job's price.

    Attributes:
        memory_bytes: Estimated peak memory of one task (of the job, if not an array).
        disk_bytes: What the job (all its tasks) writes to the run directory.
        hvps: Hessian-vector products the job computes (all its tasks).
    """

    memory_bytes: int
    disk_bytes: int
    hvps: int


#: What ARPACK takes for the shift's top eigenpair at tolerance 1e-3 (a few tens; priced high).
SHIFT_HVPS = 60
#: Keys that lower each stage's memory, for the refusal's message.
FIX_KEYS = {
    "train": ("PHYSICAL_BATCH_SIZE",),
    "replay": ("PHYSICAL_BATCH_SIZE", "k"),
    "measure": ("block_size", "HESSIAN_BATCH_SIZE"),
    "basis": ("row_block", "k"),
    "solve": ("row_block", "k"),
    "exhaustive": ("EXHAUSTIVE=false",),
    "trace": ("probes_per_task", "row_block"),
    "diagonal": ("probes_per_task", "row_block"),
    "density": ("density_steps", "row_block"),
}
#: matplotlib and the small arrays of the figures and reports.
REPORT_BYTES = 200 * MIB
#: What the analysis holds beside its D-vectors: its row blocks' budget.
ANALYSIS_BYTES = DEFAULT_BUDGET_BYTES


def _problem_bytes(facts: ProblemFacts, model_copies: int) -> int:
    return PROCESS_FLOOR_BYTES + facts.data_bytes + model_copies * facts.dim * 4


def _graph_bytes(cfg: RunConfig, facts: ProblemFacts) -> int:
    """One product's autograd graph: the examples of one pass over the data."""
    points = cfg.HESSIAN_BATCH_SIZE or cfg.NUM_HESSIAN_DATAPOINTS
    return facts.graph_bytes + facts.graph_bytes_per_example * points


def _measure_cost(spec, cfg: RunConfig, facts: ProblemFacts, job) -> JobCost:
    round_name = dict(arg.split("=", 1) for arg in job.args[1:] if "=" in arg)["round"]
    layout = spec.round_layout(round_name)
    graph = _graph_bytes(cfg, facts)
    block = layout.block_size
    memory = (
        _problem_bytes(facts, 4)
        + facts.example_bytes * cfg.NUM_HESSIAN_DATAPOINTS
        + graph * (1 + block)
        + MEASURE_BLOCK_COPIES * spec.layout.dim * block * 8
    )
    count = sum(len(spec.task_indices(task, round_name)) for task in job.tasks)
    outer = min(count, layout.num_outer) * layout.dim + count * layout.num_inner
    return JobCost(memory, outer * _itemsize(spec), count)


def _solve_cost(spec, cfg, facts, job) -> JobCost:
    """In memory, the output; in row blocks, each phase's job, the program's peak disk
    counted on its last (the basis: ``Q``; the solve: the eigen file and ``W``'s blocks it
    is copied from, which outlast the other phases' consumed results).
    """
    from hessov.rowpass import program_phases

    matrix = spec.layout.dim * spec.layout.num_outer * _itemsize(spec)
    if not spec.row_block:
        return JobCost(in_memory_solve_bytes(spec), matrix, 0)
    arguments = dict(arg.split("=", 1) for arg in job.args[1:] if "=" in arg)
    round_name = arguments.get("round", "second")
    phases = {p.name: p for p in program_phases(job.stage, spec.recovery, round_name)}
    name = arguments["phase"]
    disk = (2 if job.stage == "solve" else 1) * matrix if name == "finish" else 0
    return JobCost(row_phase_bytes(spec, phases[name]), disk, 0)


def _estimate_cost(spec, cfg: RunConfig, facts: ProblemFacts, job) -> JobCost:
    """A probe task holds the model and one block of probes as a measure task does, and the
    sketch's space in float64 (``V`` and ``H V``, or the solve's eigenvectors): in memory
    whole, in row blocks a block at a time; a density task also its Lanczos vectors. A
    finish holds the space and a few ``D``-vectors.
    """
    from hessov.probes import probe_plan

    plan = probe_plan(cfg, job.stage)
    dim = spec.layout.dim  # the sketched block's D; the model's own is in facts
    width = spec.layout.num_outer * (max(spec.krylov_rounds - 1, 1))
    rows = spec.row_block or dim
    space = 2 * rows * width * 8 + 8 * dim * 8
    if job.tasks is None:  # the finish
        return JobCost(PROCESS_FLOOR_BYTES + REPORT_BYTES + space, dim * 8 * 3, 0)
    block = 1 if plan.steps else min(plan.per_task, spec.layout.block_size)
    memory = (
        _problem_bytes(facts, 4)
        + facts.example_bytes * cfg.NUM_HESSIAN_DATAPOINTS
        + _graph_bytes(cfg, facts) * (1 + block)
        + MEASURE_BLOCK_COPIES * dim * block * 8
        + space
        + plan.steps * dim * 8
    )
    disk = len(job.tasks) * (16 * dim if job.stage == "diagonal" else 8 * plan.per_task)
    return JobCost(memory, disk, plan.hvps(job.tasks))


def _shift_cost(spec, cfg: RunConfig, facts: ProblemFacts, job) -> JobCost:
    """A few tens of single-column products (ARPACK's Lanczos for the top eigenpair) and
    its Krylov vectors, 20 of D in float64.
    """
    points = cfg.HESSIAN_BATCH_SIZE or cfg.NUM_HESSIAN_DATAPOINTS
    memory = _problem_bytes(facts, 4) + facts.example_bytes * points + 2 * _graph_bytes(cfg, facts)
    return JobCost(memory + 20 * spec.layout.dim * 8, 0, SHIFT_HVPS)


def _layout_cost(spec, cfg, facts, job) -> JobCost:
    rounds = spec.krylov_rounds if spec.recovery == "two_pass" else 2  # merge targets
    per_split = rounds * spec.layout.dim * spec.layout.num_outer
    arrays = 0 if spec.row_block else len(spec.splits) * per_split
    return JobCost(PROCESS_FLOOR_BYTES, arrays * _itemsize(spec), 0)


def _training_bytes(cfg: RunConfig, facts: ProblemFacts) -> int:
    """The problem, model, gradient and optimizer state, one physical batch's graph, and
    the examples taken: the batch (the whole split for full batch), the Hessian subsets
    whose gradients are recorded, and for inputs read on demand an evaluation's chunk.
    """
    batch = cfg.PHYSICAL_BATCH_SIZE or cfg.BATCH_SIZE or 1
    taken = cfg.BATCH_SIZE or facts.train_examples
    if cfg.RECORD_GRADIENTS:
        taken += cfg.NUM_HESSIAN_DATAPOINTS
    if facts.lazy_inputs:
        taken += EVAL_CHUNK
    graph = facts.graph_bytes + facts.graph_bytes_per_example * batch
    return _problem_bytes(facts, 5) + graph + facts.example_bytes * taken


def _train_cost(spec, cfg, facts, job) -> JobCost:
    records = len(cfg.RECORD_STEPS) + 3 * len(cfg.SNAPSHOT_STEPS)
    return JobCost(_training_bytes(cfg, facts), records * facts.dim * 4, 0)


def _replay_cost(spec, cfg, facts, job) -> JobCost:
    filter_bytes = 2 * facts.dim * spec.layout.num_outer * 8  # eigenvectors in float64
    subset = facts.example_bytes * cfg.NUM_HESSIAN_DATAPOINTS  # its eigensolver's data
    return JobCost(_training_bytes(cfg, facts) + filter_bytes + subset, 0, 0)


def _exhaustive_cost(spec, cfg, facts, job) -> JobCost:
    dim = spec.layout.dim  # the sketched block's
    dense = 3 * dim**2 * 8  # the dense Hessian, its eigenvectors, a copy
    return JobCost(_problem_bytes(facts, 4) + dense, 0, dim)


def _analyze_cost(spec, cfg, facts, job) -> JobCost:
    vectors = 4 * facts.dim * 8  # parameters, masks, row energies
    return JobCost(PROCESS_FLOOR_BYTES + REPORT_BYTES + ANALYSIS_BYTES + vectors, 0, 0)


_STAGE_COSTS = {
    "measure": _measure_cost,
    "basis": _solve_cost,
    "solve": _solve_cost,
    "layout": _layout_cost,
    "shift": _shift_cost,
    "train": _train_cost,
    "replay": _replay_cost,
    "exhaustive": _exhaustive_cost,
    "trace": _estimate_cost,
    "diagonal": _estimate_cost,
    "density": _estimate_cost,
    "analyze": _analyze_cost,
}


def job_cost(job, spec, cfg: RunConfig, facts: ProblemFacts) -> JobCost:
    """The price of one job of the stage graph (:class:`hessov.launch.graph.Job`)."""
    price = _STAGE_COSTS.get(job.stage)
    if price is None:  # compare: figures only
        return JobCost(PROCESS_FLOOR_BYTES + REPORT_BYTES, 0, 0)
    return price(spec, cfg, facts, job)


def format_bytes(count: int) -> str:
    """``count`` bytes in GiB (from 1 GiB) or MiB."""
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / MIB:.0f} MiB"


def check_budgets(jobs, cfg: RunConfig) -> None:
    """Refuse jobs whose memory exceeds their budget (:func:`memory_budget`): one line per
    stage with its largest job, naming the keys that would make it fit.

    Raises:
        ConfigError: listing every stage with a job over its budget.
    """
    worst: dict[str, tuple[int, int, str]] = {}  # stage: (bytes, jobs over, a job's name)
    for job in jobs:
        if job.memory_bytes > memory_budget(cfg, job.stage)[0]:
            most, count, name = worst.get(job.stage, (0, 0, ""))
            largest = (job.memory_bytes, job.name) if job.memory_bytes > most else (most, name)
            worst[job.stage] = (largest[0], count + 1, largest[1])
    lines = []
    for stage, (most, count, name) in worst.items():
        budget, key = memory_budget(cfg, stage)
        fixes = ", ".join((*FIX_KEYS.get(stage, ()), key.split(" ")[0]))
        lines.append(
            f"  {stage}: {count} job(s) over the {format_bytes(budget)} budget ({key}), "
            f"the largest {name!r} at {format_bytes(most)} per task; to fit, change {fixes}"
        )
    if lines:
        raise ConfigError(
            "memory: jobs over their budget (`hessov plan` prices them):\n" + "\n".join(lines)
        )
