"""The device-resident loader: same images as the worker pipeline, crops and flips as torchvision
defines them, batches independent of how the samples are split, exact resume, channels_last."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK, converted_checkpoint, finetune_cut_and_resumed
from PIL import Image

from sample_models.resnet_cifar import resnet8
from vconvert import compress, load_checkpoint
from vconvert.data.datasets import DataSpec, open_split
from vconvert.data.device import DeviceImageSet, crop_and_flip, random_crop_offsets
from vconvert.errors import BadInputError
from vconvert.train.config import FinetuneConfig
from vconvert.train.finetune import finetune
from vconvert.train.hardware import uses_device_loader

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _noise_folder(root: Path, classes: int = 3, per_class: int = 5, side: int = 32) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = torch.randint(0, 256, (side, side, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


def _device_set(dataset, augment: bool, size: int = 32) -> DeviceImageSet:
    return DeviceImageSet.from_dataset(
        dataset, input_size=[size, size], channels=3, mean=MEAN, std=STD, augment=augment, seed=3,
        device=torch.device("cpu"),
    )  # fmt: skip


def test_evaluation_batches_equal_the_worker_pipeline(tmp_path: Path) -> None:
    data = _noise_folder(tmp_path / "data")
    dataset, _, _ = open_split(str(data), False, input_size=[32, 32], mean=MEAN, std=STD, augment=False)
    images, labels = next(_device_set(dataset, augment=False).batches(range(len(dataset)), 64))
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    assert labels.tolist() == [dataset[i][1] for i in range(len(dataset))]


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_crop_and_flip_cut_the_window_of_a_padded_image(pad_mode: str) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 8, 10, generator=generator)
    offsets = random_crop_offsets(6, 2, generator)
    flips = torch.tensor([True, False, True, False, False, True])
    result = crop_and_flip(images, offsets, flips, 2, pad_mode)
    for index in range(6):
        padded = F.pad(images[index : index + 1], (2, 2, 2, 2), mode=pad_mode)[0]
        row, col = offsets[index].tolist()
        window = padded[:, row : row + 8, col : col + 10]
        torch.testing.assert_close(result[index], window.flip(2) if flips[index] else window, rtol=0, atol=0)
    assert offsets.min() >= 0 and offsets.max() <= 4


def test_a_sample_gets_the_same_augmentation_whatever_its_batch(tmp_path: Path) -> None:
    data = _noise_folder(tmp_path / "data")
    dataset, _, _ = open_split(str(data), True, input_size=[32, 32], mean=MEAN, std=STD)
    device_set = _device_set(dataset, augment=True)
    device_set.set_epoch(2)
    whole = torch.cat([images for images, _ in device_set.batches(range(15), 15)])
    rank_one = torch.cat([images for images, _ in device_set.batches(range(1, 15, 2), 4)])
    torch.testing.assert_close(rank_one, whole[1::2], rtol=0, atol=0)
    device_set.set_epoch(3)
    assert not torch.equal(torch.cat([images for images, _ in device_set.batches(range(15), 15)]), whole)


def test_images_larger_than_the_device_loader_handles_are_refused(tmp_path: Path) -> None:
    data = _noise_folder(tmp_path / "data", per_class=1, side=96)
    dataset, _, _ = open_split(str(data), True, input_size=[96, 96], mean=MEAN, std=STD)
    with pytest.raises(BadInputError, match="up to 64 pixels"):
        _device_set(dataset, augment=True, size=96)


def test_device_loader_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    source = converted_checkpoint(tmp_path / "m.vc.pt")
    config = FinetuneConfig(masks="flip", loader="device", **QUICK)
    straight = tmp_path / "straight.vc.pt"
    history = finetune(source, straight, config)
    assert history[-1].images_per_s > 0
    cut = tmp_path / "cut.vc.pt"
    finetune_cut_and_resumed(source, cut, config)
    expected, actual = load_checkpoint(straight).model.state_dict(), load_checkpoint(cut).model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_channels_last_model_computes_the_same_outputs() -> None:
    torch.manual_seed(0)
    model, _ = compress(resnet8().eval(), torch.randn(2, 3, 32, 32))
    images = torch.randn(4, 3, 32, 32)
    expected = model(images)
    model.to(memory_format=torch.channels_last)
    actual = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_digits_are_cropped_but_never_mirrored() -> None:
    dataset, spec, _ = open_split("digits", True)
    device_set = DeviceImageSet.from_dataset(
        dataset, input_size=spec.input_size, channels=spec.channels, mean=spec.mean, std=spec.std,
        augment=True, seed=0, device=torch.device("cpu"),
    )  # fmt: skip
    images, _ = next(device_set.batches(range(64), 64))
    raw = images * device_set.std + device_set.mean
    side = spec.input_size[0]
    for index in range(64):
        padded = F.pad(device_set.images[index : index + 1], (2, 2, 2, 2))[0]
        windows = [padded[:, r : r + side, c : c + side] for r in range(5) for c in range(5)]
        assert any(torch.allclose(raw[index], window, atol=1e-5) for window in windows), index


@pytest.mark.parametrize(
    ("device", "side", "images", "loader", "expected"),
    [
        ("cpu", 32, 60_000, "auto", True),  # CIFAR-10: 0.17 GiB in host memory
        ("cpu", 32, 400_000, "auto", False),  # 1.15 GiB: worker processes
        ("cpu", 96, 100, "auto", False),  # larger images need random-resized crops
        ("cuda", 32, 400_000, "auto", True),
        ("cpu", 32, 100, "workers", False),
        ("cpu", 96, 100, "device", True),  # forced (from_dataset then refuses it with a sentence)
    ],
    ids=["cpu-cifar", "cpu-too-big", "cpu-large-images", "cuda", "forced-workers", "forced-device"],
)
def test_auto_loader_choice(device: str, side: int, images: int, loader: str, expected: bool) -> None:
    spec = DataSpec("data", [side, side], 3, MEAN, STD, ["a", "b"])
    config = FinetuneConfig(loader=loader)
    assert uses_device_loader(config, spec, torch.device(device), images) is expected
