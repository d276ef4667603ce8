"""Layer-wise distillation: every converted conv's output is matched to the output of the original
conv at the same place in the teacher (FitNets-style hints at every converted layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vconvert.errors import BadInputError
from vconvert.nn.versatile import versatile_layers


def relative_squared_error(student: Tensor, teacher: Tensor) -> Tensor:
    """‖student − teacher‖² / ‖teacher‖² over the whole batch, in fp32 whatever the autocast dtype."""
    student, teacher = student.float(), teacher.float()
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


class ConvOutputs:
    """Records the outputs of the named submodules of ``model`` on every forward (forward hooks)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, Tensor] = {}
        self._handles = [model.get_submodule(name).register_forward_hook(self._keeper(name)) for name in names]

    def _keeper(self, name: str):
        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.outputs[name] = output

        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class FeatureDistillation:
    """Hooks on the converted convs of ``student`` and the same-named modules of ``teacher``; ``loss()``
    after a forward of both is the mean relative squared error over those layers."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        teacher_names = {name for name, _ in teacher.named_modules()}
        self.names = [name for name, _ in versatile_layers(student) if name in teacher_names]
        if not self.names:
            raise BadInputError(
                "`feature_weight` needs the teacher to hold the converted convs under the same names; "
                "this checkpoint's teacher holds none of them."
            )
        self.student = ConvOutputs(student, self.names)
        self.teacher = ConvOutputs(teacher, self.names)

    def loss(self) -> Tensor:
        errors = [relative_squared_error(self.student.outputs[n], self.teacher.outputs[n]) for n in self.names]
        self.student.outputs.clear()
        self.teacher.outputs.clear()
        return torch.stack(errors).mean()

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al. 2015)."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2
