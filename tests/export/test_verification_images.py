"""export verifies a .vc.pt on real images when it records an image folder that exists here."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import noise_image_folder

from vconvert.export.checkpoint import load_verification_images
from vconvert.io.metadata import CheckpointMetadata

PREPROCESSING = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "input_size": [32, 32]}


@pytest.mark.parametrize("recorded_as", ["finetune-data", "bn-recalibration", "nothing"])
def test_verification_images_come_from_the_folder_the_checkpoint_records(tmp_path: Path, recorded_as: str) -> None:
    root = str(noise_image_folder(tmp_path / "images"))
    data = {"source": root, "input_size": [32, 32], "channels": 3, "classes": ["a", "b"],
            "mean": PREPROCESSING["mean"], "std": PREPROCESSING["std"]}  # fmt: skip
    metadata = CheckpointMetadata(input_shape=[1, 3, 32, 32], preprocessing=PREPROCESSING)
    if recorded_as == "finetune-data":
        metadata.data = data
    elif recorded_as == "bn-recalibration":
        metadata.bn_recalibration = {"data": root, "images": 12}
    batches, note = load_verification_images(metadata, [1, 3, 32, 32])
    if recorded_as == "nothing":
        assert batches is None and note.startswith("random normal inputs")
        return
    assert [tuple(batch.shape) for batch in batches] == [(1, 3, 32, 32), (4, 3, 32, 32)]
    assert note == f"4 real images from {root}"


def test_the_int8_calibration_folder_also_gives_the_verification_images(tmp_path: Path) -> None:
    root = noise_image_folder(tmp_path / "calibration")
    metadata = CheckpointMetadata(input_shape=[1, 3, 32, 32], preprocessing=PREPROCESSING)  # records no folder
    batches, note = load_verification_images(metadata, [1, 3, 32, 32], root)
    assert [tuple(batch.shape) for batch in batches] == [(1, 3, 32, 32), (4, 3, 32, 32)]
    assert note == f"4 real images from {root}"


def test_a_hostile_calibration_folder_is_read_as_every_image_folder_is(tmp_path: Path) -> None:
    """A FIFO named .png (would block), PostScript named .png (would reach ghostscript) and a link out of the
    folder: none is opened; the real images calibrate."""
    import os

    from vconvert.export.calibration import calibration_images

    root = noise_image_folder(tmp_path / "calibration")
    os.mkfifo(root / "train" / "a" / "fifo.png")
    (root / "train" / "a" / "script.png").write_bytes(b"%!PS-Adobe-3.0\n(x) print\n")
    outside = noise_image_folder(tmp_path / "outside")
    (root / "train" / "b" / "link.png").symlink_to(outside / "train" / "a" / "0.png")
    batches, _ = calibration_images(root, [1, 3, 32, 32], PREPROCESSING, limit=64)
    assert sum(len(batch) for batch in batches) == 6  # the six real images of train/
