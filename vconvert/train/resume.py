"""Each epoch's checkpoints and what an interrupted run resumes from: the last epoch's file carries the
optimiser, scheduler, mask-rule, RNG and (with EMA) live-weight state, checked field by field when read back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from vconvert.data.datasets import DataSpec
from vconvert.errors import BadInputError
from vconvert.io.checkpoint import Checkpoint, save
from vconvert.io.files import atomic_write_bytes, same_file
from vconvert.io.metadata import CheckpointMetadata
from vconvert.train.config import EpochMetrics, FinetuneConfig
from vconvert.train.ema import WeightAverage
from vconvert.train.masks import (
    MaskLearner,
    canonicalise_masks_,
    drop_latent_weights_,
)
from vconvert.validate import check_fields, check_float, check_int, check_like, check_mapping, is_int, is_number


# --------------------------------------------------------------------------- the run
def _output_paths(output: Path) -> tuple[Path, Path, Path]:
    stem = output.name[: -len(".vc.pt")] if output.name.endswith(".vc.pt") else output.stem
    return output, output.with_name(f"{stem}.best.vc.pt"), output.with_name(f"{stem}.metrics.jsonl")


OUTPUT_ROLES = ("last-epoch checkpoint", "best-epoch checkpoint", "metrics file")


def check_outputs_spare_input(checkpoint_path: str | Path, outputs: tuple[Path, Path, Path], resume: bool) -> None:
    """Refuse (BadInputError, before any work) a run whose files (``outputs``: last, best, metrics, as
    :func:`_output_paths` names them) would overwrite its input checkpoint or each other, whether by the
    same path or the same file through a symlink or a hard link. A resumed run reads its last-epoch file,
    not ``checkpoint_path``: that one may be the input."""
    for index, (role, path) in enumerate(zip(OUTPUT_ROLES, outputs, strict=True)):
        if not (resume and index == 0) and same_file(path, checkpoint_path):
            same = "" if Path(path) == Path(checkpoint_path) else f" {path} (the same file)"
            raise BadInputError(
                f"The run would overwrite its input checkpoint {checkpoint_path} with its {role}{same}; "
                "choose another `output`."
            )
        for other_role, other in zip(OUTPUT_ROLES[index + 1 :], outputs[index + 1 :], strict=True):
            if same_file(path, other):
                raise BadInputError(
                    f"The run's {role} {path} and its {other_role} {other} are one file; choose another `output`."
                )


# The value of an option a file written before the option existed ran with (its default otherwise).
BEFORE_THE_OPTION = {"grad_clip": 0.0}  # gradient clipping came in 0.1.0 (session 14): runs before never clipped
# Fields of FinetuneConfig that may be None, and the type of their value otherwise.
_OPTIONAL_FIELDS = {"data": str, "train_limit": int, "eval_limit": int, "weight_bits": int, "mean": list, "std": list}


def _checked_config(value: object, path: Path) -> dict:
    """The options a run recorded, checked as strictly as the command line checks typed ones: fields of
    :class:`FinetuneConfig` only, each of its type (finite numbers; lists of finite numbers); a field an older
    vconvert did not record takes the value that version ran with (:data:`BEFORE_THE_OPTION`, else its default)."""
    where = f"`resume`: {path}'s recorded options"
    defaults = {**asdict(FinetuneConfig()), **BEFORE_THE_OPTION}
    recorded = {**defaults, **check_fields(value, where, (), tuple(defaults))}
    for name, default in defaults.items():
        item = recorded[name]
        expected = _OPTIONAL_FIELDS.get(name, type(default))
        if item is None and name in _OPTIONAL_FIELDS:
            continue
        if expected is float and is_number(item):
            check_float(item, f"{where} {name}")
        elif expected is int and is_int(item):
            check_int(item, f"{where} {name}", 0)
        elif expected is list and isinstance(item, list) and all(is_number(v) for v in item):
            for index, number in enumerate(item):
                check_float(number, f"{where} {name}[{index}]")
        elif type(item) is not expected:
            raise BadInputError(f"{where}: {name} holds a {type(item).__name__}, not a {expected.__name__}: the file "
                                "is damaged.")  # fmt: skip
    return recorded


def resumed_config(
    recorded: object, config: FinetuneConfig, typed: Collection[str] | None, path: Path
) -> FinetuneConfig:
    """The options of a resumed run: the ones the caller set (``typed``: field names; None, as for a Python
    caller's whole config, means all) must equal those the run recorded in ``path``, which give the rest."""
    recorded = _checked_config(recorded, path)
    typed = set(recorded) if typed is None else set(typed)
    merged = {name: getattr(config, name) if name in typed else value for name, value in recorded.items()}
    if merged != recorded:
        raise BadInputError(
            f"`resume`: {path} was written by a run with other options: {_differences({'config': recorded}, merged)}; "
            "leave those options out (a resumed run takes the ones it was started with) or start a new run."
        )
    return FinetuneConfig(**merged)


def _differences(state: dict, config: FinetuneConfig | dict) -> str:
    """Each option that differs between the run that wrote a file (``state["config"]``) and ``config``."""
    given = config if isinstance(config, dict) else asdict(config)
    recorded = state["config"] if isinstance(state["config"], dict) else {}
    changed = [name for name in given if recorded.get(name) != given[name]]
    return "; ".join(f"`{name}` {given[name]!r} here, {recorded.get(name)!r} in the run" for name in changed[:6])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.cuda.is_available() and isinstance(cuda, list) and len(cuda) == torch.cuda.device_count():
        if all(isinstance(item, torch.Tensor) and item.dtype == torch.uint8 for item in cuda):
            torch.cuda.set_rng_state_all(cuda)  # the same devices: the run continues exactly


RESUME_FIELDS = ("config", "optimiser", "scheduler", "masks", "mask_proxies", "rng", "epoch", "history", "best_top1",
                 "base_metadata")  # fmt: skip


def _check_resume_state(value: object, config: FinetuneConfig, source: Checkpoint, path: Path) -> dict:
    """The resume state of a checkpoint, its plain fields checked (the parts that mirror this run's
    optimiser, scheduler, masks and weights are checked against them when they exist)."""
    where = f"`resume`: {path}'s fine-tuning state"
    averaged = ("live_weights", "ema") if config.ema else ()
    state = check_fields(value, where, RESUME_FIELDS + averaged, ("start_top1", "start_top5"))  # optional: older runs
    recorded = {**asdict(FinetuneConfig()), **BEFORE_THE_OPTION, **check_mapping(state["config"], f"{where} config")}
    if recorded != asdict(config):
        raise BadInputError(
            f"`resume`: {path} was written by a run with other options: {_differences({'config': recorded}, config)}."
        )
    epoch = check_int(state["epoch"], f"{where} epoch", 1, config.epochs)
    check_float(state["best_top1"], f"{where} best_top1")
    for name in ("start_top1", "start_top5"):
        if name in state:
            check_float(state[name], f"{where} {name}", finite=False)
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise BadInputError(f"{where} history must list the {epoch} epochs done: the file is damaged.")
    names = tuple(item.name for item in fields(EpochMetrics))
    for index, entry in enumerate(history):
        entry = check_fields(entry, f"{where} history[{index}]", names)
        check_int(entry["epoch"], f"{where} history[{index}] epoch")
        check_int(entry["mask_flips"], f"{where} history[{index}] mask_flips")
        for name in names[1:-1]:
            check_float(entry[name], f"{where} history[{index}] {name}", finite=False)
        check_mapping(entry["extra"], f"{where} history[{index}] extra")
    check_fields(state["rng"], f"{where} rng", ("torch",), ("cuda",))
    channels = source.plan.input_shape[1]
    default_shape = source.plan.input_shape
    state["base_metadata"] = CheckpointMetadata.from_dict(
        state["base_metadata"], f"{where} base_metadata", channels, default_shape
    ).carried()
    return state


def _check_optimiser_state(optimiser: torch.optim.Optimizer, value: object, where: str) -> None:
    """The optimiser's saved state: its parameter groups like this run's, and each per-parameter tensor
    (momentum) of its parameter's shape and dtype."""
    saved = check_fields(value, where, ("state", "param_groups"))
    check_like(optimiser.state_dict()["param_groups"], saved["param_groups"], f"{where} param_groups")
    parameters = [parameter for group in optimiser.param_groups for parameter in group["params"]]
    entries = saved["state"]
    if not isinstance(entries, dict) or not all(isinstance(k, int) and 0 <= k < len(parameters) for k in entries):
        raise BadInputError(f"{where} state must map parameter numbers to their state: the file is damaged.")
    for index, entry in entries.items():
        for key, item in check_mapping(entry, f"{where} state[{index}]").items():
            if isinstance(item, torch.Tensor):  # momentum of the parameter's shape, or a scalar (a step count)
                template = parameters[index].detach() if item.ndim else torch.zeros((), dtype=item.dtype)
            else:
                template = None if item is None else 0.0
            check_like(template, item, f"{where} state[{index}][{key!r}]")


def _average_state(student: nn.Module, average: WeightAverage | None) -> dict:
    """With an EMA, the resume state keeps the live weights and the average (the file's model is the average)."""
    if average is None:
        return {}
    live = {name: tensor.detach().cpu() for name, tensor in student.state_dict().items()}
    return {"live_weights": live, "ema": average.state_dict()}


def restore_training_state(
    state: dict,
    last_path: Path,
    student: nn.Module,
    masks: MaskLearner,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[list[EpochMetrics], float, int]:
    """Put a checked resume state (:func:`_check_resume_state`) back into this run's optimiser, schedule,
    mask rule, weights and RNG; returns (history, best top-1, epochs done)."""
    where = f"`resume`: {last_path}'s fine-tuning state"
    _check_optimiser_state(optimiser, state["optimiser"], f"{where} optimiser")
    check_like(scheduler.state_dict(), state["scheduler"], f"{where} scheduler")
    check_like(masks.state_dict(), state["masks"], f"{where} masks")
    proxies = {name: layer.mask_proxy.detach() for name, layer in masks.layers}
    check_like(proxies, state["mask_proxies"], f"{where} mask_proxies")
    check_like(torch.get_rng_state(), state["rng"]["torch"], f"{where} rng")
    if "live_weights" in state:
        check_like(student.state_dict(), state["live_weights"], f"{where} live_weights")
    optimiser.load_state_dict(state["optimiser"])
    scheduler.load_state_dict(state["scheduler"])
    masks.load_state_dict(state["masks"])
    with torch.no_grad():
        if "live_weights" in state:  # with an EMA the file holds the average, the state the weights
            student.load_state_dict(state["live_weights"])
        for name, proxy in state["mask_proxies"].items():
            student.get_submodule(name).mask_proxy.copy_(proxy)
    _restore_rng(state["rng"])
    return [EpochMetrics(**entry) for entry in state["history"]], state["best_top1"], state["epoch"]


def _snapshot(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` as files hold it: canonical masks, no latent weights (the project rule's training
    state travels in the resume state)."""
    snapshot = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    canonicalise_masks_(snapshot)  # threshold 0.5 / proxies 0.75, 0.25 whatever the training rule
    drop_latent_weights_(snapshot)
    return snapshot


@dataclass
class EpochFiles:
    """The files a run writes after each epoch: the last checkpoint (with resume state), the best one when
    validation improved, and the metrics lines."""

    last_path: Path
    best_path: Path
    metrics_path: Path
    source: Checkpoint
    spec: DataSpec
    config: FinetuneConfig
    base_metadata: CheckpointMetadata  # what the run carries from its source (CheckpointMetadata.carried)
    start: tuple[float, float] = (math.nan, math.nan)  # the start's validation (top-1, top-5), kept for resuming
    _start_model: nn.Module | None = None  # held until the first epoch's files are written

    def keep_start(self, student: nn.Module, top1: float, top5: float) -> None:
        """Hold the model the run starts from, validated: the first epoch writes it as the best file unless that
        epoch beats it (nothing is written before an epoch ends)."""
        self.start = (top1, top5)
        self._start_model = _snapshot(student)

    def _metadata(self, epochs_done: int, top1: float, top5: float) -> CheckpointMetadata:
        """The metadata of a file holding the model after ``epochs_done`` epochs (0: the start)."""
        spec, config = self.spec, self.config
        record = {"config": asdict(config), "epochs_done": epochs_done, "complete": epochs_done == config.epochs,
                  "val_top1": top1, "val_top5": top5}  # fmt: skip
        preprocessing = {"mean": spec.mean, "std": spec.std, "input_size": spec.input_size}
        return replace(self.base_metadata, data=spec.to_dict(), preprocessing=preprocessing, finetune=record)

    def write(
        self,
        student: nn.Module,
        teacher: nn.Module,
        metrics: EpochMetrics,
        history: list[EpochMetrics],
        best_top1: float,
        training: dict,
    ) -> None:
        """Write this epoch's files (``training``: the optimiser, schedule, mask and RNG state)."""
        snapshot, teacher = _snapshot(student), _snapshot(teacher)
        config, source = self.config, self.source
        metadata = self._metadata(metrics.epoch, metrics.val_top1, metrics.val_top5)
        state = {
            **training,
            "config": asdict(config),
            "history": [asdict(entry) for entry in history],
            "best_top1": max(best_top1, metrics.val_top1),
            "start_top1": self.start[0],
            "start_top5": self.start[1],
            "base_metadata": self.base_metadata.to_dict(),
        }
        if metrics.val_top1 > best_top1:
            save(self.best_path, snapshot, source.plan, source.base, teacher, metadata)
        elif self._start_model is not None:  # the first epoch did not beat the start: the start is the best file
            save(self.best_path, self._start_model, source.plan, source.base, teacher, self._metadata(0, *self.start))
        self._start_model = None
        save(self.last_path, snapshot, source.plan, source.base, teacher, replace(metadata, finetune_state=state))
        lines = "".join(json.dumps(asdict(entry)) + "\n" for entry in history)
        atomic_write_bytes(lines.encode(), self.metrics_path)
