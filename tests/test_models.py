"""Models as researchers write them: BatchNorm, dropout, registered buffers, tuple and dict
inputs, token inputs through an embedding, frozen parameters, and the errors for bad input.

Each model is trained a few steps in this process by the train stage (``build_problem``
replaced by the test's factory); the Hessian operator the sketch stages build at a recorded
step (:func:`hessov.hessian.hessian_at_step`) must equal the dense Hessian computed here
independently: double backprop over the flattened trainable parameters, in float64, on the
model in eval mode with the state (parameters and buffers) of the snapshot of that step.
"""

from __future__ import annotations

import dataclasses
import json

import h5py
import pytest
import torch
from torch import nn

from hessov import hessian as hessian_module
from hessov.config import ReplayConfig, RunConfig
from hessov.errors import ConfigError
from hessov.hessian import hessian_at_step, recorded_subsets
from hessov.problems import Problem
from hessov.problems.data import as_split
from hessov.skerch_ext.operator import AutogradHessian, dense_matrix
from hessov.stages import replay as replay_stage
from hessov.stages import train as train_stage
from hessov.stages.check_operator import check_operator
from hessov.stages.exhaustive import exhaustive
from hessov.stages.layout import layout
from hessov.training import load_snapshot, to_device

STEP = 4  # recorded and snapshotted: the state after four updates
CLASSES = 3
SUBSET = 12  # Hessian examples, 4 per class


# ---- models -----------------------------------------------------------------------------


class BatchNormCNN(nn.Module):
    """Conv, BatchNorm2d, tanh, linear, BatchNorm1d (eval: the running statistics)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn2d = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
        self.fc, self.bn1d = nn.Linear(18, CLASSES), nn.BatchNorm1d(CLASSES)

    def forward(self, x):
        return self.bn1d(self.fc(torch.tanh(self.bn2d(self.conv(x))).flatten(1)))


class DropoutMLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, CLASSES))


class RunningScale(nn.Module):
    """A registered buffer used in forward, updated (an average of |x|) in train mode."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, CLASSES)
        self.register_buffer("scale", torch.ones(6))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.5).add_(0.5 * x.abs().mean(dim=0))
        return self.fc2(torch.tanh(self.fc1(x / self.scale)))


class MaskedTwoInputs(nn.Module):
    """``model(x, mask)``: a tuple of inputs, one of them a float mask."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, CLASSES)

    def forward(self, x, mask):
        return self.fc2(torch.tanh(self.fc1(x * mask)))


class NamedInputs(nn.Module):
    """``model(image=..., extra=...)``: a dict of inputs, with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5 + 2, CLASSES)

    def forward(self, image, extra):
        return self.fc2(torch.cat([torch.tanh(self.bn(self.fc1(image))), extra], dim=1))


class TokenClassifier(nn.Module):
    """Int64 token ids ``(N, L)`` through an embedding, mean-pooled, then linear."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 4), nn.Linear(4, CLASSES)

    def forward(self, tokens):
        return self.fc(torch.tanh(self.embed(tokens).mean(dim=1)))


class PartlyFrozen(nn.Module):
    """A frozen first layer (``requires_grad=False``) and a frozen BatchNorm affine."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, CLASSES)
        for param in (*self.fc1.parameters(), self.bn.weight):
            param.requires_grad_(False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


class RandomInEval(nn.Module):
    """Functional dropout with ``training=True``: random even in eval mode, if switched on."""

    random = False

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, CLASSES)

    def forward(self, x):
        hidden = torch.tanh(self.fc1(x))
        if self.random:
            hidden = nn.functional.dropout(hidden, 0.5, training=True)
        return self.fc2(hidden)


# ---- data and problems ------------------------------------------------------------------


def labels(count: int) -> torch.Tensor:
    return torch.arange(count) % CLASSES


def features(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 6, generator=torch.Generator().manual_seed(seed))


class PairDataset(torch.utils.data.Dataset):
    """A map-style dataset of ``((x, mask), y)`` items."""

    def __init__(self, count: int, seed: int):
        self.x, self.y = features(count, seed), labels(count)
        self.mask = torch.rand(count, 6, generator=torch.Generator().manual_seed(seed)) > 0.3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return (self.x[index], self.mask[index].float()), self.y[index]


def data_for(model_class: type, count: int, seed: int):
    """A split for ``model_class``: the structure its forward takes."""
    if model_class is BatchNormCNN:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, 1, 5, 5, generator=generator), labels(count)
    if model_class is MaskedTwoInputs:
        return PairDataset(count, seed)
    if model_class is NamedInputs:
        extra = torch.randn(count, 2, generator=torch.Generator().manual_seed(seed + 7))
        return {"image": features(count, seed), "extra": extra}, labels(count)
    if model_class is TokenClassifier:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, 10, (count, 7), generator=generator), labels(count)
    return features(count, seed), labels(count)


def factory(model_class: type):
    """A problem factory as ``build_problem``: the model seeded from the run's seed."""

    def build(cfg: RunConfig) -> Problem:
        torch.manual_seed(cfg.RANDOM_SEED)
        return Problem(
            model=model_class(),
            loss=nn.CrossEntropyLoss(),
            train=data_for(model_class, 48, 1),
            test=data_for(model_class, 24, 2),
            num_classes=CLASSES,
            name=model_class.__name__,
        )

    return build


def use_factory(monkeypatch, build) -> None:
    """Every stage module that builds the problem builds it with ``build``."""
    for module in (train_stage, hessian_module, replay_stage):
        monkeypatch.setattr(module, "build_problem", build)


def trained(tmp_path, monkeypatch, model_class: type, build=None, **settings):
    """A run of ``model_class`` trained ``STEP`` steps in float32: ``(run, cfg)``; ``build``
    replaces the test's default factory of ``model_class``.
    """
    use_factory(monkeypatch, build or factory(model_class))
    cfg = RunConfig(
        problem=model_class.__name__,
        OUTPUT_DIR=str(tmp_path),
        threads=1,
        MAX_STEPS=STEP,
        BATCH_SIZE=8,
        EVAL_EVERY=2,
        RECORD_STEPS=[0, STEP],
        SNAPSHOT_STEPS=[STEP],
        NUM_HESSIAN_DATAPOINTS=SUBSET,
        **settings,
    )
    return train_stage.train(cfg), cfg


# ---- the reference ----------------------------------------------------------------------


def call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def as_float64(inputs):
    def cast(tensor):
        return tensor.double() if tensor.is_floating_point() else tensor

    if isinstance(inputs, dict):
        return {key: cast(value) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(cast(value) for value in inputs)
    return cast(inputs)


def rows(inputs, index):
    if isinstance(inputs, dict):
        return {key: value[index] for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(value[index] for value in inputs)
    return inputs[index]


def dense_hessian(model: nn.Module, inputs, targets) -> torch.Tensor:
    """``(D, D)``: the Hessian of the mean cross-entropy over the trainable parameters of
    ``model`` (float64, eval mode), one double-backprop row per parameter entry.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(call(model, inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    result = []
    for entry in flat:
        second = torch.autograd.grad(entry, params, retain_graph=True, allow_unused=True)
        parts = [
            torch.zeros_like(p) if s is None else s for s, p in zip(second, params, strict=True)
        ]
        result.append(torch.cat([s.reshape(-1) for s in parts]))
    return torch.stack(result)


def reference(run, cfg, model_class: type, buffers_from_snapshot: bool = True):
    """The dense Hessian of the train subset at ``STEP`` from the snapshot of that step."""
    problem = factory(model_class)(cfg)
    initial = [buffer.clone() for buffer in problem.model.buffers()]
    problem.model.load_state_dict(load_snapshot(run.snapshot(STEP), "cpu")["model"])
    if not buffers_from_snapshot:
        for buffer, value in zip(problem.model.buffers(), initial, strict=True):
            buffer.copy_(value)
    subset = recorded_subsets(run)["train"]
    data = problem.train
    model = problem.model.double()
    return dense_hessian(model, as_float64(rows(data.inputs, subset)), data.targets[subset])


def pipeline_hessian(run, cfg, **settings) -> torch.Tensor:
    """The dense matrix of the sketch stages' operator at ``STEP`` in float64."""
    cfg64 = dataclasses.replace(cfg, dtype="float64", **settings)
    hessian = hessian_at_step(run, cfg64, STEP, "train")
    return dense_matrix(
        hessian.matmat,
        hessian.dim,
        block_size=16,
        dtype=torch.float64,
        device="cpu",
        progress=False,
    )


def assert_same_hessian(ours: torch.Tensor, dense: torch.Tensor) -> None:
    assert ours.shape == dense.shape
    assert float(dense.abs().max()) > 1e-3  # a Hessian worth comparing
    torch.testing.assert_close(ours, dense, rtol=1e-9, atol=1e-11)


# ---- 1-3: BatchNorm, dropout, registered buffers -----------------------------------------


def test_batchnorm_hessian_uses_the_running_statistics_of_the_recorded_step(tmp_path, monkeypatch):
    run, cfg = trained(tmp_path, monkeypatch, BatchNormCNN)
    with h5py.File(run.params, "r") as handle:
        buffer_layout = json.loads(handle.attrs["buffer_layout"])
        names = [entry["name"] for entry in buffer_layout]
        assert "bn2d.running_mean" in names and "bn1d.num_batches_tracked" in names
        assert handle["buffers"].shape == ((2 + 2 + 1) + (3 + 3 + 1), 2)  # two columns
        recorded = handle["buffers"][:, 1]
    state = load_snapshot(run.snapshot(STEP), "cpu")["model"]
    for entry in buffer_layout:
        start, size = entry["offset"], int(torch.tensor(entry["shape"]).prod())
        value = torch.from_numpy(recorded[start : start + size]).view(entry["shape"])
        torch.testing.assert_close(value, state[entry["name"]].double(), rtol=0, atol=0)
    assert int(state["bn1d.num_batches_tracked"]) == STEP
    ours = pipeline_hessian(run, cfg)
    assert_same_hessian(ours, reference(run, cfg, BatchNormCNN))
    # With the initial statistics the Hessian is another matrix: the buffers were loaded.
    initial = reference(run, cfg, BatchNormCNN, buffers_from_snapshot=False)
    assert float((initial - ours).abs().max()) > 1e-3 * float(ours.abs().max())


def test_dropout_is_off_and_the_operator_deterministic(tmp_path, monkeypatch):
    run, cfg = trained(tmp_path, monkeypatch, DropoutMLP)
    hessian = hessian_at_step(run, dataclasses.replace(cfg, dtype="float64"), STEP, "train")
    probe = torch.randn(hessian.dim, 3, dtype=torch.float64)
    assert torch.equal(hessian.matmat(probe), hessian.matmat(probe))
    assert_same_hessian(pipeline_hessian(run, cfg), reference(run, cfg, DropoutMLP))


def test_registered_buffer_of_the_recorded_step(tmp_path, monkeypatch):
    run, cfg = trained(tmp_path, monkeypatch, RunningScale)
    with h5py.File(run.params, "r") as handle:
        assert [e["name"] for e in json.loads(handle.attrs["buffer_layout"])] == ["scale"]
        first, last = handle["buffers"][:, 0], handle["buffers"][:, 1]
    assert (first == 1).all() and not (last == 1).any()
    ours = pipeline_hessian(run, cfg)
    assert_same_hessian(ours, reference(run, cfg, RunningScale))
    initial = reference(run, cfg, RunningScale, buffers_from_snapshot=False)
    assert float((initial - ours).abs().max()) > 1e-3 * float(ours.abs().max())


# ---- 4-5: tuple and dict inputs, token inputs --------------------------------------------


def test_as_split_takes_datasets_tuples_and_dicts():
    split = as_split(PairDataset(10, 0))
    assert isinstance(split.inputs, tuple) and len(split.inputs) == 2
    assert split.inputs[0].shape == (10, 6) and split.targets.dtype == torch.int64
    tensors = as_split(torch.utils.data.TensorDataset(features(5, 0), labels(5)))
    assert torch.equal(tensors.inputs, features(5, 0)) and len(tensors) == 5
    named = as_split(({"a": torch.zeros(4, 2), "b": torch.zeros(4)}, labels(4)))
    assert set(named.inputs) == {"a", "b"}
    with pytest.raises(ConfigError, match="problem: inputs hold a tensor of shape"):
        as_split(({"a": torch.zeros(4, 2), "b": torch.zeros(3)}, labels(4)))


@pytest.mark.parametrize(
    ("model_class", "settings"),
    [
        (MaskedTwoInputs, {"PHYSICAL_BATCH_SIZE": 3, "HESSIAN_BATCH_SIZE": 5}),
        (NamedInputs, {"HESSIAN_BATCH_SIZE": 0}),
    ],
)
def test_tuple_and_dict_inputs(tmp_path, monkeypatch, model_class, settings):
    run, cfg = trained(tmp_path, monkeypatch, model_class, **settings)
    assert_same_hessian(pipeline_hessian(run, cfg), reference(run, cfg, model_class))


def test_integer_tokens_keep_their_dtype_through_an_embedding(tmp_path, monkeypatch):
    problem = factory(TokenClassifier)(RunConfig(problem="tokens"))
    to_device(problem, "cpu", "float64")
    assert problem.train.inputs.dtype == torch.int64
    assert problem.model.embed.weight.dtype == torch.float64
    run, cfg = trained(tmp_path, monkeypatch, TokenClassifier)
    assert_same_hessian(pipeline_hessian(run, cfg), reference(run, cfg, TokenClassifier))


# ---- 6: frozen parameters ---------------------------------------------------------------


def test_frozen_parameters_are_not_in_d(tmp_path, monkeypatch):
    problem = factory(PartlyFrozen)(RunConfig(problem="frozen"))
    trainable = 5 + 3 * 5 + 3  # bn.bias, fc2.weight, fc2.bias
    assert problem.num_params == trainable
    run, cfg = trained(tmp_path, monkeypatch, PartlyFrozen)
    with h5py.File(run.params, "r") as handle:
        assert handle["data"].shape == (trainable, 2)
        layout_names = [e["name"] for e in json.loads(handle.attrs["parameter_layout"])]
        frozen = json.loads(handle.attrs["frozen_parameters"])
    assert layout_names == ["bn.bias", "fc2.weight", "fc2.bias"]
    assert frozen == [
        {"name": "fc1.weight", "shape": [5, 6]},
        {"name": "fc1.bias", "shape": [5]},
        {"name": "bn.weight", "shape": [5]},
    ]
    state = load_snapshot(run.snapshot(STEP), "cpu")["model"]
    assert torch.equal(state["fc1.weight"], problem.model.fc1.weight)  # never trained
    ours = pipeline_hessian(run, cfg)
    assert ours.shape == (trainable, trainable)
    assert_same_hessian(ours, reference(run, cfg, PartlyFrozen))


# ---- the other stages on these models ---------------------------------------------------


def test_exhaustive_and_check_operator_on_a_batchnorm_model(tmp_path, monkeypatch):
    run, cfg = trained(tmp_path, monkeypatch, BatchNormCNN)
    cfg = dataclasses.replace(cfg, k=8, HESSIAN_STEPS=[STEP], HESSIAN_SPLITS=["train"])
    assert check_operator(run, cfg, STEP, "train")["symmetric"]
    fields = exhaustive(run, cfg, layout(run, cfg), STEP, "train")
    exact = torch.linalg.eigvalsh(reference(run, cfg, BatchNormCNN))
    exact = exact[exact.abs().argsort(descending=True)]
    torch.testing.assert_close(
        torch.tensor(fields["exact_eigenvalues"], dtype=torch.float64),
        exact[: len(fields["exact_eigenvalues"])],
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.mark.parametrize("model_class", [NamedInputs, PartlyFrozen])
def test_replay_with_dict_inputs_batchnorm_or_frozen_parameters(tmp_path, monkeypatch, model_class):
    run, cfg = trained(tmp_path, monkeypatch, model_class)
    replay = ReplayConfig(
        name="filtered",
        mode="flat_scaling_v1",
        scaling=2.0,
        nfilter=2,
        eig_freq=2,
        neigs=3,
        MAX_STEPS=3,
        EVAL_EVERY=2,
    )
    fields = replay_stage.run_replay(run, cfg, replay)
    assert fields["steps"] == 3 and fields["stopped_by"] == "MAX_STEPS"
    assert fields["eig_computations"] == 2 and fields["max_sharpness"] > 0


# ---- 7: errors that say what to change --------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_nan_or_inf_in_the_data_names_the_split(split):
    data = {"train": (features(6, 0), labels(6)), "test": (features(6, 1), labels(6))}
    data[split][0][2, 3] = float("nan") if split == "train" else float("inf")
    with pytest.raises(ConfigError, match=rf"^problem: the {split} split's inputs hold 1 NaN"):
        Problem(DropoutMLP(), nn.CrossEntropyLoss(), data["train"], data["test"], CLASSES)


def test_a_loss_without_mean_reduction_is_refused():
    data = (features(6, 0), labels(6))
    with pytest.raises(ConfigError, match=r"^problem: .*reduction='sum'.*reduction='mean'"):
        Problem(DropoutMLP(), nn.CrossEntropyLoss(reduction="sum"), data, data, CLASSES)


def test_a_model_random_in_eval_mode_is_refused_naming_the_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(RandomInEval, "random", True)
    # The check names where the two calls part: in the model's forward, before fc2.
    where = r"the model \(RandomInEval\), before it calls 'fc2' \(Linear\)"
    with pytest.raises(ConfigError, match=rf"^problem: .*{where}.*functional\.dropout"):
        trained(tmp_path / "refused", monkeypatch, RandomInEval)
    problem = factory(RandomInEval)(RunConfig(problem="random"))
    train = problem.train
    operator = AutogradHessian(problem.model, problem.loss, train.inputs, train.targets)
    with pytest.raises(RuntimeError, match=r"random in eval mode.*functional\.dropout"):
        operator.check_deterministic()
    # A run trained without the random operation, then measured with it: refused with the key.
    monkeypatch.setattr(RandomInEval, "random", False)
    run, cfg = trained(tmp_path, monkeypatch, RandomInEval)
    monkeypatch.setattr(RandomInEval, "random", True)
    with pytest.raises(ConfigError, match=r"^problem: .*not deterministic.*functional\.dropout"):
        check_operator(run, cfg, STEP, "train")


# ---- a loss that takes the model and the batch --------------------------------------------


class NextToken(nn.Module):
    """A tiny language model: embedding, tanh, a linear read-out per position."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(10, 3), nn.Linear(3, 10)

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens)))


def next_token_loss(model, tokens, _targets):
    """Mean cross-entropy of every next token: the inputs are the targets, shifted."""
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 10), tokens[:, 1:].reshape(-1))


def test_a_model_loss_of_a_language_model_gives_its_hessian(tmp_path, monkeypatch):
    """``hessov.ModelLoss(fn)``: ``fn(model, inputs, targets)`` is the objective (here
    next-token prediction, where ``targets`` are unused); the pipeline's operator at a
    recorded step equals the dense Hessian of that objective.
    """
    import hessov

    def build(cfg: RunConfig) -> Problem:
        torch.manual_seed(cfg.RANDOM_SEED)
        generator = torch.Generator().manual_seed(3)
        tokens = torch.randint(0, 10, (36, 6), generator=generator)
        unused = torch.zeros(36, dtype=torch.int64)
        return Problem(
            model=NextToken(),
            loss=hessov.ModelLoss(next_token_loss),
            train=(tokens[:24], unused[:24]),
            test=(tokens[24:], unused[24:]),
            num_classes=0,
            name="NextToken",
        )

    run, cfg = trained(tmp_path, monkeypatch, NextToken, build)
    problem = build(cfg)
    problem.model.load_state_dict(load_snapshot(run.snapshot(STEP), "cpu")["model"])
    model = problem.model.double().eval()
    tokens = problem.train.inputs[recorded_subsets(run)["train"]]
    params = list(model.parameters())
    grads = torch.autograd.grad(next_token_loss(model, tokens, None), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows_of_h = [
        torch.cat([s.reshape(-1) for s in torch.autograd.grad(entry, params, retain_graph=True)])
        for entry in flat
    ]
    assert_same_hessian(pipeline_hessian(run, cfg, HESSIAN_BATCH_SIZE=5), torch.stack(rows_of_h))
