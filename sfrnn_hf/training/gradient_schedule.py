"""A schedule of gradient modes: the model's `config.gradient_mode` changes at given optimizer steps or epochs, for
example DSF for the cheap first part of a run and exact BPTT for its last part.

```yaml
model:
  gradient_mode: dsf                 # the mode the run starts in
training:
  gradient_mode_schedule:            # from these points on (optimizer steps or epochs completed), another mode
    - {after_epochs: 20, gradient_mode: bptt}
```

The mode only changes the backward (the forward, hence evaluation and generation, is the same in every mode), and
`gradient_mode` is read at every forward of a live model, so a switch is setting it before a step. The callback sets
the mode of each optimizer step from the step's number alone, so a resume on either side of a switch continues
exactly, and a switch after step N equals resuming step N's checkpoint with the other mode. Each checkpoint's
`config.json` records the mode its last step trained with, `experiment.yaml` the schedule.
"""

import math
from dataclasses import dataclass

from transformers import TrainerCallback
from transformers.utils import logging

from ..configuration_sfrnn import GRADIENT_MODES

logger = logging.get_logger(__name__)
_POINTS = ("after_steps", "after_epochs")


@dataclass(frozen=True)
class ModeSwitch:
    """From `after_steps` optimizer steps (or `after_epochs` epochs) completed on, train with `gradient_mode`."""

    gradient_mode: str
    after_steps: int | None = None
    after_epochs: int | None = None

    def start_step(self, steps_per_epoch: int) -> int:
        return self.after_steps if self.after_steps is not None else self.after_epochs * steps_per_epoch


def parse_schedule(entries: list) -> list[ModeSwitch]:
    """`training.gradient_mode_schedule` checked: each entry a mapping with `gradient_mode` and exactly one of
    `after_steps` / `after_epochs` (a positive integer), points in increasing order, all in the same unit.
    Raises `ValueError` naming the bad entry."""
    switches = []
    for index, entry in enumerate(entries):
        where = f"`training.gradient_mode_schedule[{index}]`"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping like {{after_epochs: 20, gradient_mode: bptt}}, got {entry!r}.")
        unknown = set(entry) - {"gradient_mode", *_POINTS}
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; keys: gradient_mode, after_steps or "
                             "after_epochs.")
        mode = entry.get("gradient_mode")
        if mode not in GRADIENT_MODES:
            raise ValueError(f"{where}: gradient_mode must be one of {list(GRADIENT_MODES)}, got {mode!r}.")
        points = [key for key in _POINTS if key in entry]
        if len(points) != 1:
            raise ValueError(f"{where} needs exactly one of after_steps / after_epochs, got {entry!r}.")
        value = entry[points[0]]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {points[0]} must be a positive integer, got {value!r}.")
        switches.append(ModeSwitch(mode, **{points[0]: value}))
    units = {"after_steps" if s.after_steps is not None else "after_epochs" for s in switches}
    if len(units) > 1:
        raise ValueError("`training.gradient_mode_schedule` mixes after_steps and after_epochs: use one unit.")
    starts = [s.start_step(1) for s in switches]
    if starts != sorted(set(starts)):
        raise ValueError(f"`training.gradient_mode_schedule`: the switch points must increase, got {starts}.")
    return switches


class GradientModeSchedule(TrainerCallback):
    """Sets the model's `config.gradient_mode` before every optimizer step: `initial_mode` until the first switch
    point, then each switch's mode. `sfrnn-train` installs it when `training.gradient_mode_schedule` is set; add it to
    a plain `Trainer` the same way (`GradientModeSchedule("dsf", parse_schedule([...]))`)."""

    def __init__(self, initial_mode: str, switches: list[ModeSwitch]):
        if initial_mode not in GRADIENT_MODES:
            raise ValueError(f"initial_mode must be one of {list(GRADIENT_MODES)}, got {initial_mode!r}.")
        self.initial_mode = initial_mode
        self.switches = list(switches)
        self.steps_per_epoch = None

    def mode_at(self, completed_steps: int) -> str:
        """The mode of the optimizer step that follows `completed_steps` steps."""
        mode = self.initial_mode
        for switch in self.switches:
            if completed_steps >= switch.start_step(self.steps_per_epoch or 0):
                mode = switch.gradient_mode
        return mode

    def resolved(self) -> list[dict]:
        """The schedule in optimizer steps (for results.json), once training has begun."""
        return [{"after_steps": s.start_step(self.steps_per_epoch), "gradient_mode": s.gradient_mode}
                for s in self.switches]

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        # The Trainer's own count: optimizer steps per epoch (a last, partial accumulation counts as one).
        self.steps_per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
        self._apply(model, state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step)

    def _apply(self, model, completed_steps: int) -> None:
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        mode = self.mode_at(completed_steps)
        if config.gradient_mode != mode:
            logger.info(f"Step {completed_steps + 1}: gradient_mode {config.gradient_mode} -> {mode}.")
            config.gradient_mode = mode


__all__ = ["ModeSwitch", "parse_schedule", "GradientModeSchedule"]
