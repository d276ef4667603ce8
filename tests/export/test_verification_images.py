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
