"""The `training` section of a training config: every `transformers.TrainingArguments` field by its own name, each
checked against the type transformers declares and the range its optimizer assumes, plus `TrainingConfig`, the keys
that are this package's own. `train.training_arguments` builds the `TrainingArguments` with `HfArgumentParser`.

An earlier config's names still load: `lr`, `epochs`, `adam_eps`, `eval_batch_size`, `gradient_checkpointing`
(`LEGACY_TRAINING_KEYS`) and a nested `trainer_args:` mapping are read as the fields they set today.
"""

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from huggingface_hub.dataclasses import strict, validated_field

from ..configuration_sfrnn import HALF_OPEN_UNIT_INTERVAL, POSITIVE, UNIT_INTERVAL, in_range
from .config_reading import ConfigError, checked, strict_section, unknown_key
from .gradient_schedule import parse_schedule

NON_NEGATIVE = in_range(0)


@strict
@dataclass
class TrainingConfig:
    """The `training` keys that are this package's own; every other `training` key is a `TrainingArguments` field."""

    # GLOBAL batch per optimizer step, whatever the number of devices and accumulation steps
    batch_size: int = validated_field(POSITIVE, default=128)
    scheduler: Literal["step", "warmup_cosine", "constant"] = "constant"
    step_every: float = validated_field(in_range(0, 1, low_open=True), default=1 / 3)  # step: run fraction per decay
    step_gamma: float = validated_field(POSITIVE, default=0.1)  # (the paper: x0.1 every 10 of 30 epochs)
    # warmup_cosine: linear warm-up over this fraction, then cosine to min_lr_ratio * learning_rate
    warmup_ratio: float = validated_field(HALF_OPEN_UNIT_INTERVAL, default=0.1)
    min_lr_ratio: float = validated_field(UNIT_INTERVAL, default=0.1)
    evaluate_test: bool = True  # evaluate the best model on the test split at the end
    resume_from_checkpoint: bool | str | None = None  # true: the newest intact checkpoint in output_dir | a path
    overwrite_output_dir: bool = False  # a new run into a folder holding an earlier run: delete it first
    # the model's gradient_mode from a point on, e.g. [{after_epochs: 20, gradient_mode: bptt}] (gradient_schedule.py)
    gradient_mode_schedule: list[dict] = field(default_factory=list)

    def validate_resume(self):
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and not os.path.isdir(resume):
            raise ValueError(f"`training.resume_from_checkpoint`: {resume!r} is not a checkpoint folder.")

    def validate_schedule(self):
        parse_schedule(self.gradient_mode_schedule)


# `TrainingArguments` fields: this package's defaults where they differ from transformers' (the paper's protocol), the
# ranges transformers leaves to the optimizer, the fields a TrainingConfig key sets, and the names of earlier configs.
TRAINER_DEFAULTS = {"output_dir": "runs/sfrnn", "num_train_epochs": 1.0, "learning_rate": 1e-3, "max_grad_norm": 0.0,
                    "seed": 0, "eval_strategy": "epoch", "save_total_limit": 2, "logging_steps": 50,
                    "report_to": "auto",  # tensorboard when installed
                    "per_device_eval_batch_size": None,  # the per-device training batch
                    "activation_checkpointing": False}
TRAINER_RANGES = {"learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "adam_epsilon": POSITIVE,
                  "adam_beta1": HALF_OPEN_UNIT_INTERVAL, "adam_beta2": HALF_OPEN_UNIT_INTERVAL,
                  "max_grad_norm": NON_NEGATIVE, "logging_steps": POSITIVE, "save_total_limit": POSITIVE,
                  "gradient_accumulation_steps": POSITIVE, "eval_steps": POSITIVE,
                  "per_device_eval_batch_size": POSITIVE}
SET_BY = {"per_device_train_batch_size": "batch_size", "lr_scheduler_type": "scheduler",
          "lr_scheduler_kwargs": "scheduler", "warmup_steps": "warmup_ratio", "load_best_model_at_end": "eval_strategy",
          "metric_for_best_model": "eval_strategy", "greater_is_better": "eval_strategy"}
LEGACY_TRAINING_KEYS = {"lr": "learning_rate", "epochs": "num_train_epochs", "adam_eps": "adam_epsilon",
                        "eval_batch_size": "per_device_eval_batch_size",
                        "gradient_checkpointing": "activation_checkpointing"}


@functools.cache
def trainer_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """`{TrainingArguments field a config may set: (field, declared type)}`. (The annotation, not `Field.type`, which
    `HfArgumentParser` rewrites in place: `IntervalStrategy | str` becomes `IntervalStrategy` once it has parsed.)"""
    from transformers import TrainingArguments

    hints = get_type_hints(TrainingArguments)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in SET_BY}


def trainer_default(name: str):
    """The value a run has for `TrainingArguments` field `name` when its config does not set it."""
    if name in TRAINER_DEFAULTS:
        return TRAINER_DEFAULTS[name]
    f = trainer_fields()[name][0]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def canonical_training(values: dict, spelled: dict | None = None) -> dict:
    """`training` under today's names: an earlier config's `lr`, `epochs`... as the `TrainingArguments` fields they
    set, a `trainer_args` mapping's keys as `training` keys (`spelled`: filled with `{name: the name given}`)."""
    values = dict(values)
    nested = values.pop("trainer_args", None) or {}
    if not isinstance(nested, dict):
        raise ConfigError(f"`training.trainer_args` must be a mapping, got {nested!r}.")
    canonical = {}
    for given, value in [*values.items(), *nested.items()]:
        key = LEGACY_TRAINING_KEYS.get(given, given)
        if key in canonical:
            raise ConfigError(f"`training.{key}` is given twice (as {given!r} too): keep one.")
        canonical[key] = value
        if spelled is not None:
            spelled.setdefault(key, f"trainer_args.{given}" if given in nested and given not in values else given)
    return canonical


def canonical_override(path: list[str], spelled: dict) -> list[str]:
    """The key path a `training.<earlier name>` (or `training.trainer_args.<name>`) override sets today; `spelled`
    records the name given."""
    given = ".".join(path[1:])
    path = ["training", *path[2:]] if path[1] == "trainer_args" and len(path) > 2 else path
    path = ["training", LEGACY_TRAINING_KEYS.get(path[1], path[1]), *path[2:]]
    spelled[path[1]] = given
    return path


def read_training_section(values, spelled: dict) -> tuple[TrainingConfig, dict]:
    """`training` (today's names): TrainingConfig, and the `TrainingArguments` fields with the package's defaults."""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"Section `training` must be a mapping, got {values!r}.")
    values = values or {}
    ours = {key: value for key, value in values.items() if key in TrainingConfig.__dataclass_fields__}
    trainer_args = dict(TRAINER_DEFAULTS)
    for key, value in values.items():
        if key in SET_BY:
            raise ConfigError(f"`training.{key}` is set by `training.{SET_BY[key]}`; use that instead.")
        if key in ours or (value is None and TRAINER_DEFAULTS.get(key, 0) is None):  # (None: the package default)
            continue
        if key not in trainer_fields():
            raise unknown_key("training", key, [*TrainingConfig.__dataclass_fields__, *trainer_fields()],
                              TrainingConfig.__dataclass_fields__, ", and any other transformers.TrainingArguments field")
        trainer_args[key] = checked(f"training.{spelled.get(key, key)}", value, trainer_fields()[key][1],
                                    [TRAINER_RANGES[key]] if key in TRAINER_RANGES else [])
    training = strict_section(TrainingConfig, "training", ours)
    if trainer_args["num_train_epochs"] <= 0 and trainer_args.get("max_steps", -1) <= 0:
        raise ConfigError(f"`training.num_train_epochs` must be positive (or set max_steps), got "
                          f"{trainer_args['num_train_epochs']!r}.")
    if trainer_args["eval_strategy"] == "steps" and trainer_args.get("eval_steps") is None:
        raise ConfigError("`training.eval_strategy: steps` needs `training.eval_steps`.")
    return training, trainer_args
