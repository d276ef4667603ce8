"""Layer-wise distillation (``finetune --feature-distill``): the error measure, which layers it
hooks, the loss it returns and the gradient it sends to the primary filters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sample_models.resnet_cifar import resnet8
from vconvert import compress
from vconvert.errors import BadInputError
from vconvert.nn.versatile import versatile_layers
from vconvert.train.distill import FeatureDistillation, relative_squared_error


def test_relative_squared_error() -> None:
    teacher = torch.randn(4, 8, 5, 5)
    assert relative_squared_error(teacher, teacher).item() == 0.0
    assert relative_squared_error(torch.zeros_like(teacher), teacher).item() == pytest.approx(1.0)
    assert relative_squared_error(3 * teacher, teacher).item() == pytest.approx(4.0)
    assert relative_squared_error(teacher.bfloat16(), teacher).dtype == torch.float32


@pytest.mark.parametrize("mode", ["learned", "spatial"])
def test_loss_is_the_mean_error_of_the_converted_convs_and_reaches_the_primaries(mode: str) -> None:
    torch.manual_seed(0)
    teacher = resnet8().eval()
    student, _ = compress(teacher, torch.randn(2, 3, 32, 32), mode=mode)
    features = FeatureDistillation(student, teacher)
    names = [name for name, _ in versatile_layers(student)]
    assert features.names == names and len(names) > 3
    images = torch.randn(4, 3, 32, 32)
    student(images)
    with torch.no_grad():
        teacher(images)
    expected = torch.stack(
        [relative_squared_error(features.student.outputs[n], features.teacher.outputs[n]) for n in names]
    ).mean()
    loss = features.loss()
    torch.testing.assert_close(loss, expected)
    assert 0 < loss.item() < 1 and not features.student.outputs  # a fitted start; records cleared
    loss.backward()
    assert all(layer.primary.grad is not None and layer.primary.grad.abs().sum() > 0 for _, layer in
               versatile_layers(student))  # fmt: skip
    features.remove()
    student(images)
    assert not features.student.outputs


def test_a_teacher_without_the_converted_layers_is_refused() -> None:
    torch.manual_seed(0)
    student, _ = compress(resnet8().eval(), torch.randn(2, 3, 32, 32))
    with pytest.raises(BadInputError, match="same names"):
        FeatureDistillation(student, nn.Sequential(nn.Conv2d(3, 10, 3)))
