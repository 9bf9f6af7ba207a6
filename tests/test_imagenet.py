"""The imagenet_resnet18 problem: ResNet-18 against the published architecture, the image
folder reader on small folders of real JPEG files written here, and the pipeline through the
tiny preset on such a folder.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_hessov
from hessov.batching import LazyRows, example_bytes, non_finite_count, resident_bytes
from hessov.config import load_run_config
from hessov.errors import ConfigError, DatasetNotFoundError
from hessov.problems import build_problem
from hessov.problems.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cropped_pixels,
    evaluation_transform,
    imagenet_splits,
    scan_split,
)
from hessov.problems.networks import ResNet18
from hessov.training import evaluate, evaluation_indices

#: Two ImageNet class folders (wnids), in sorted order.
WNIDS = ("n01440764", "n01443537")


def published_resnet18_shapes(classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """He et al. 2016, table 1, in torchvision's parameter names: a 7x7/2 convolution of 64,
    then stages of two basic blocks with 64, 128, 256 and 512 channels (3x3 convolutions
    without bias, each followed by batch norm; a 1x1 projection where the shape changes),
    then a linear layer on 512 pooled features.
    """
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    stages = {1: (64, 64), 2: (64, 128), 3: (128, 256), 4: (256, 512)}
    for stage, (entering, channels) in stages.items():
        for block in (0, 1):
            prefix = f"layer{stage}.{block}"
            width = entering if block == 0 else channels
            shapes[f"{prefix}.conv1.weight"] = (channels, width, 3, 3)
            shapes[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
            for norm in ("bn1", "bn2"):
                shapes[f"{prefix}.{norm}.weight"] = shapes[f"{prefix}.{norm}.bias"] = (channels,)
        if stage > 1:
            shapes[f"layer{stage}.0.downsample.0.weight"] = (channels, entering, 1, 1)
            for part in ("weight", "bias"):
                shapes[f"layer{stage}.0.downsample.1.{part}"] = (channels,)
    shapes["fc.weight"], shapes["fc.bias"] = (classes, 512), (classes,)
    return shapes


def test_resnet18_has_the_published_parameters_and_layer_shapes():
    model = ResNet18()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == published_resnet18_shapes()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    running = [name for name, _ in model.named_buffers() if name.endswith("running_mean")]
    assert len(running) == 20  # 17 convolutions' batch norms + 3 projections'


def test_resnet18_halves_224_pixels_five_times_to_7x7():
    model = ResNet18().eval()
    sizes = {}
    for name in ("maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert sizes == {
        "maxpool": (64, 56, 56),
        "layer1": (64, 56, 56),
        "layer2": (128, 28, 28),
        "layer3": (256, 14, 14),
        "layer4": (512, 7, 7),
    }


def write_image_folder(root, per_class: dict[str, int], seed: int = 0) -> None:
    """``root/imagenet/{train,val}/<wnid>/*.JPEG``: random JPEGs of varied sizes, the class
    visible as one saturated channel; a stray text file in each class folder.
    """
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, wnid in enumerate(WNIDS):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            (folder / "README.txt").write_text("not an image")
            for index in range(count):
                height, width = rng.integers(36, 80, size=2)
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                pixels[..., label] = 255
                Image.fromarray(pixels).save(folder / f"{wnid}_{index}.JPEG", quality=90)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("obs")
    write_image_folder(root, {"train": 6, "val": 3})
    return root


def test_evaluation_transform_resizes_the_short_side_and_crops_the_centre():
    # 300 x 200 (width x height): the short side becomes 256, the long one 384; the crop
    # starts 80 pixels in. The left and right 150 columns are black and white, so the
    # crop's 224 columns split into 112 and 112 around the bilinear filter's blur.
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[:, 150:] = 255
    out = evaluation_transform(Image.fromarray(pixels), 224)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    black, white = (0 - mean) / std, (1 - mean) / std
    assert torch.equal(out[:, :, 0], black[:, None].expand(3, 224))
    assert torch.equal(out[:, :, 223], white[:, None].expand(3, 224))
    # The edge sits at 192 of 384 resized columns, column 112 of the crop: symmetric blur.
    middle = out[0, 0, 108:116]
    assert torch.allclose(middle + middle.flip(0), black[0] + white[0], atol=1e-2)


def test_the_resize_truncates_the_long_side_and_the_crop_offset_rounds_half_to_even():
    # 224 x 301 (width x height) at crop 32: the short side becomes round(32 * 256 / 224) =
    # 37, the long one int(37 * 301 / 224) = 49 (49.72 truncated). The crop's top offset is
    # round((49 - 32) / 2) = round(8.5) = 8 and its left one round(2.5) = 2, so the row of
    # white pixels at 8/49 of the height (resized row 8) is the crop's first row.
    pixels = np.zeros((301, 224, 3), dtype=np.uint8)
    rows = np.arange(301)
    pixels[(rows * 49 // 301) == 8] = 255
    out = cropped_pixels(Image.fromarray(pixels), 32)
    assert out.shape == (3, 32, 32)
    brightness = out[0].float().mean(dim=1)
    # Resized rows 7, 8, 9 average 16, 184 and 48 (the filter's blur): an offset of 7 or 9
    # would start the crop on 16 or 48.
    assert int(brightness.argmax()) == 0 and brightness[0] > 128


def test_evaluation_transform_of_a_constant_image_is_exactly_the_normalised_colour():
    colour = (10, 128, 250)
    out = evaluation_transform(Image.new("RGB", (50, 90), colour), 32)
    expected = (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / (
        torch.tensor(IMAGENET_STD)
    )
    assert torch.equal(out, expected[:, None, None].expand(3, 32, 32))


def test_a_split_is_indexed_by_sorted_class_and_file_and_read_on_demand(image_folder):
    rows, labels = scan_split(image_folder / "imagenet" / "train", 32)
    assert rows.classes == list(WNIDS)
    assert labels.tolist() == [0] * 6 + [1] * 6
    assert rows.path(7).name == f"{WNIDS[1]}_1.JPEG"  # README.txt is not an image
    assert rows.shape == (12, 3, 32, 32) and isinstance(rows, LazyRows)
    taken = rows[torch.tensor([7, 0])]
    assert taken.shape == (2, 3, 32, 32)
    with Image.open(rows.path(0)) as image:
        assert torch.equal(taken[1], evaluation_transform(image, 32))
    assert torch.equal(rows[0:2][0], taken[1])
    assert rows.to(dtype=torch.float64)[torch.tensor([0])].dtype == torch.float64
    assert resident_bytes(rows) == 0 and example_bytes(rows) == 3 * 32 * 32 * 4
    assert non_finite_count(rows) == 0
    with pytest.raises(IndexError, match="12 examples"):
        rows[torch.tensor([12])]


def test_a_missing_or_malformed_image_folder_names_the_expected_layout(image_folder, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="OBS_DATASETS is not set"):
        imagenet_splits(None, 224)
    with pytest.raises(DatasetNotFoundError, match=r"imagenet/train.*\n.*train/<wnid>/\*\.JPEG"):
        imagenet_splits(tmp_path, 224)
    write_image_folder(tmp_path, {"train": 1, "val": 1})
    (tmp_path / "imagenet" / "val" / WNIDS[1]).rename(tmp_path / "imagenet" / "val" / "n0")
    with pytest.raises(DatasetNotFoundError, match="different class folders"):
        imagenet_splits(tmp_path, 224)
    (tmp_path / "imagenet" / "val" / "n9").mkdir()
    with pytest.raises(DatasetNotFoundError, match="n9 holds no images"):
        imagenet_splits(tmp_path, 224)


def test_the_problem_has_one_output_per_class_folder(image_folder):
    cfg = load_run_config(
        ["problem=imagenet_resnet18", f"OBS_DATASETS={image_folder}", "image_size=32"]
    )
    problem = build_problem(cfg)
    assert problem.num_classes == 2 and len(problem.train) == 12 and len(problem.test) == 6
    assert problem.num_params == 11_689_512 - 998 * 513
    with pytest.raises(ConfigError, match="image_size"):
        load_run_config(["problem=imagenet_resnet18", "image_size=16"])


def test_an_evaluation_of_count_examples_averages_over_those_spread_through_the_split():
    assert evaluation_indices(12, 4).tolist() == [0, 3, 6, 9]
    torch.manual_seed(0)
    model, loss = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss()
    inputs, targets = torch.randn(12, 3), torch.randint(0, 2, (12,))
    # In chunks of 3 over 4 chosen examples (2 chunks), against one pass over them.
    mean, accuracy = evaluate(model, loss, inputs, targets, 2, count=4, chunk_size=3)
    chosen = torch.tensor([0, 3, 6, 9])
    with torch.no_grad():
        logits = model(inputs[chosen])
    assert mean == pytest.approx(float(loss(logits, targets[chosen])), rel=1e-6)
    assert accuracy == float((logits.argmax(1) == targets[chosen]).float().mean())
    assert evaluate(model, loss, inputs, targets, 2, count=0)[0] != pytest.approx(mean)


def test_imagenet_resnet18_trains_and_sketches_through_the_tiny_preset(image_folder, tmp_path):
    """Every job of the plan up to the solve, as slurm/run_sequential.sh runs them: ResNet-18
    with its 11.2M parameters (two classes) on 32x32 crops, two steps, a sketch of k = 2.
    """
    settings = [
        "problem=imagenet_resnet18",
        "preset=tiny",
        f"OBS_DATASETS={image_folder}",
        f"OUTPUT_DIR={tmp_path}",
        "image_size=32",
        *("MAX_STEPS=2", "BATCH_SIZE=4", "EVAL_EVERY=2", "EVAL_DATAPOINTS=4"),
        *("RECORD_STEPS=[2]", "SNAPSHOT_STEPS=[]", "HESSIAN_SPLITS=[train]"),
        *("NUM_HESSIAN_DATAPOINTS=2", "k=2", "block_size=2", "NUM_A_POSTERIORI=2"),
        "optimizer.lr=0.01",
        "noise=gaussian",  # SSRFT columns cost seconds each at D in the millions (README)
    ]
    lines = run_hessov("plan", "--prepare", "--jobs", *settings).stdout.splitlines()
    run = lines[0].split("\t")[1]
    for line in lines[1:]:
        _, name, stage, _, tasks, _, *args = line.split("\t")
        if stage == "analyze":
            continue
        for task in tasks.split(",") if tasks != "-" else [None]:
            env = None if task is None else {"SLURM_ARRAY_TASK_ID": task}
            run_hessov(*args, env=env)
    summary = json.loads(run_hessov("summary", run).stdout)
    assert summary["train"]["steps_run"] == 2 and summary["train"]["num_params"] == 11_177_538
    eigenvalues = summary["solve"]["2"]["train"]["eigenvalues"]
    assert len(eigenvalues) == 2 and all(math.isfinite(v) for v in eigenvalues)
    with h5py.File(f"{run}/params.h5", "r") as handle:
        assert handle["data"].shape == (11_177_538, 1)
    events = [json.loads(line) for line in open(f"{run}/log.jsonl")]
    evals = [e for e in events if e.get("event") == "eval"]
    assert evals and all(0 <= e["train_accuracy"] <= 1 for e in evals)
