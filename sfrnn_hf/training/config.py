"""The training configuration: a YAML file (a path, or a shipped config's name) of four sections, plus `section.key=value`
overrides; checked whole before any data is read. `model`: SfrnnConfig fields (the tokenizer gives the vocabulary and
special tokens) or `from_pretrained: <path>`; `data`: DataConfig; `training`: any `transformers.TrainingArguments`
field by its own name (`train.training_arguments` builds them with `HfArgumentParser`) and TrainingConfig, the
package's own; `lora`: LoraSection. Sections are strict dataclasses with types, choices and ranges on their fields;
an earlier config's names (`LEGACY_TRAINING_KEYS`, a `trainer_args` mapping) still load and resume.
"""

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from huggingface_hub.dataclasses import strict, validated_field

from ..configuration_sfrnn import SfrnnConfig, fold_feedback_type
from ..lora_targets import RECURRENT_LORA_PARAMETERS, check_lora_targets
from .config_reading import (ConfigError, apply_override, checked, parse_overrides, read_yaml, resolve_config_path,
                             shipped_configs, strict_section, unknown_key)
from .data import DATASETS, SEQUENCE_LAYOUTS, TOKENIZERS, check_source
from .gradient_schedule import parse_schedule


def _range(low, high=None, low_open=False, high_open=False):
    """A validator of `low <= value <= high` (an open end excludes its bound); None passes (an unset optional)."""
    def check(value):
        if value is None or isinstance(value, str):  # (a string: the type check's error)
            return
        if (value <= low if low_open else value < low) or (
                high is not None and (value >= high if high_open else value > high)):
            if high is None:
                raise ValueError("must be positive" if low == 0 and low_open else f"must be at least {low}")
            raise ValueError(f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")
    return check


POSITIVE, NON_NEGATIVE, UNIT = _range(0, low_open=True), _range(0), _range(0, 1, high_open=True)


@strict
@dataclass
class DataConfig:
    dataset: Literal[DATASETS] = "ptb"  # ptb_char: the standard character-level PTB; text: local files
    sequences: Literal[SEQUENCE_LAYOUTS] = "sentence"  # one line a sequence, padded | concatenated, fixed chunks
    max_length: int = validated_field(_range(2), default=65)  # sentence: truncation incl. <bos>/<eos>; stream: chunk
    tokenizer: str = "auto"  # auto | word | char | bpe | gpt2 | path of a saved tokenizer
    bpe_vocab_size: int = validated_field(POSITIVE, default=16000)
    train_files: list[str] | None = None  # dataset `text` only
    validation_files: list[str] | None = None
    test_files: list[str] | None = None
    max_train_samples: int | None = validated_field(POSITIVE, default=None)  # the first N training sequences only
    max_eval_samples: int | None = validated_field(POSITIVE, default=None)
    num_proc: int | None = validated_field(POSITIVE, default=None)

    def validate_tokenizer(self):
        if self.tokenizer not in TOKENIZERS and not os.path.isdir(self.tokenizer):
            raise ValueError(f"`data.tokenizer` must be one of {list(TOKENIZERS)} or a saved tokenizer folder; "
                             f"{self.tokenizer!r} is neither (no such folder).")
        if self.dataset == "ptb_char" and self.tokenizer == "char":
            raise ValueError("`data.dataset: ptb_char` separates its characters by spaces (`a e r _ b a n k`): its "
                             "tokens are the space-separated symbols, so use `data.tokenizer: auto` (word), not 'char'.")

    def validate_files(self):
        for split in ("train_files", "validation_files", "test_files"):
            if getattr(self, split) and self.dataset != "text":
                raise ValueError(f"`data.{split}` is only read with `data.dataset: text`, not {self.dataset!r}.")
            for path in getattr(self, split) or []:
                if not os.path.isfile(path):
                    raise ValueError(f"`data.{split}`: file {path!r} not found.")
        if self.dataset == "text" and not self.train_files:
            raise ValueError("`data.dataset: text` needs `data.train_files` (local text files).")

    def validate_source(self):
        check_source(self.dataset)


@strict
@dataclass
class TrainingConfig:
    """The `training` keys that are this package's own; every other `training` key is a `TrainingArguments` field."""

    # GLOBAL batch per optimizer step, whatever the number of devices and accumulation steps
    batch_size: int = validated_field(POSITIVE, default=128)
    scheduler: Literal["step", "warmup_cosine", "constant"] = "constant"
    step_every: float = validated_field(_range(0, 1, low_open=True), default=1 / 3)  # step: run fraction between decays
    step_gamma: float = validated_field(POSITIVE, default=0.1)  # (the paper: x0.1 every 10 of 30 epochs)
    # warmup_cosine: linear warm-up over this fraction, then cosine to min_lr_ratio * learning_rate
    warmup_ratio: float = validated_field(UNIT, default=0.1)
    min_lr_ratio: float = validated_field(_range(0, 1), default=0.1)
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


@strict
@dataclass
class LoraSection:
    enabled: bool = False
    r: int = validated_field(POSITIVE, default=8)
    alpha: int = validated_field(POSITIVE, default=16)
    target_parameters: list[str] = field(default_factory=lambda: list(RECURRENT_LORA_PARAMETERS))
    target_modules: list[str] = field(default_factory=list)
    merge_at_end: bool = True  # also save the merged model (an ordinary sfrnn checkpoint) in output_dir/merged

    def validate_targets(self):
        try:
            check_lora_targets(self.target_modules, self.target_parameters)
        except ValueError as error:
            raise ValueError(f"lora.{error}") from None
        if self.enabled and not self.target_parameters and not self.target_modules:
            raise ValueError("LoRA needs at least one of `lora.target_parameters` and `lora.target_modules`.")


# `TrainingArguments` fields: this package's defaults where they differ from transformers' (the paper's protocol), the
# ranges transformers leaves to the optimizer, the fields a TrainingConfig key sets, and the names of earlier configs.
TRAINER_DEFAULTS = {"output_dir": "runs/sfrnn", "num_train_epochs": 1.0, "learning_rate": 1e-3, "max_grad_norm": 0.0,
                    "seed": 0, "eval_strategy": "epoch", "save_total_limit": 2, "logging_steps": 50,
                    "report_to": "auto",  # tensorboard when installed
                    "per_device_eval_batch_size": None,  # the per-device training batch
                    "activation_checkpointing": False}
TRAINER_RANGES = {"learning_rate": POSITIVE, "weight_decay": NON_NEGATIVE, "adam_epsilon": POSITIVE, "adam_beta1": UNIT,
                  "adam_beta2": UNIT, "max_grad_norm": NON_NEGATIVE, "logging_steps": POSITIVE,
                  "save_total_limit": POSITIVE, "gradient_accumulation_steps": POSITIVE, "eval_steps": POSITIVE,
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


@dataclass
class ExperimentConfig:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer_args: dict = field(default_factory=lambda: dict(TRAINER_DEFAULTS))  # TrainingArguments fields set
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = ""  # the file it was read from

    def to_dict(self) -> dict:
        """The `experiment.yaml` form: the sections as a config file writes them (it loads back to this config)."""
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "training": {**self.trainer_args, **dataclasses.asdict(self.training)},
                "lora": dataclasses.asdict(self.lora)}


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


def _training(values, spelled: dict) -> tuple[TrainingConfig, dict]:
    """`training` (today's names): TrainingConfig, and the `TrainingArguments` fields with the package's defaults."""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"Section `training` must be a mapping, got {values!r}.")
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


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (a path or a shipped name; None: all defaults), apply `section.key=value` overrides and check
    everything that can be checked without data. Raises `ConfigError` naming the bad key, value or path."""
    source = resolve_config_path(name_or_path) if name_or_path is not None else ""
    raw = read_yaml(source) if source else {}
    spelled = {}  # training key: the name the config gave it (for errors)
    if isinstance(raw.get("training"), dict):
        raw["training"] = canonical_training(raw["training"], spelled)
    for path, value in parse_overrides(list(overrides)):
        if path[0] == "training":  # an earlier name overrides the key it names today
            given = ".".join(path[1:])
            path = ["training", *path[2:]] if path[1] == "trainer_args" and len(path) > 2 else path
            path = ["training", LEGACY_TRAINING_KEYS.get(path[1], path[1]), *path[2:]]
            spelled[path[1]] = given
        apply_override(raw, path, value)
    for key in raw:
        if key not in ("model", "data", "training", "lora"):
            raise unknown_key("config", key, ("model", "data", "training", "lora"))
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"Section `model` must be a mapping, got {model!r}.")
    try:
        model = fold_feedback_type(model)  # an earlier config's `feedback_type: calibrated`
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    training, trainer_args = _training(raw.get("training"), spelled)
    config = ExperimentConfig(model=dict(model), data=strict_section(DataConfig, "data", raw.get("data")),
                              training=training, trainer_args=trainer_args,
                              lora=strict_section(LoraSection, "lora", raw.get("lora")), source=source)
    check_model_section(config.model)
    if config.lora.enabled and config.model.get("from_pretrained") is None:
        raise ConfigError("LoRA fine-tunes a trained checkpoint: set `model.from_pretrained` (or pass --lora PATH).")
    return config


MODEL_DERIVED_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
MODEL_FIELDS = tuple(name for name in SfrnnConfig.__annotations__ if name not in MODEL_DERIVED_FIELDS)


def check_model_section(model: dict) -> SfrnnConfig | None:
    """The model section as an `SfrnnConfig` with a placeholder vocabulary (None with `from_pretrained`); its
    ValueErrors name the bad field."""
    for key, value in model.items():
        if key in MODEL_DERIVED_FIELDS:
            raise ConfigError(f"`model.{key}` is set from the tokenizer; remove it from the config.")
        if key != "from_pretrained" and key not in MODEL_FIELDS:
            raise unknown_key("model", key, MODEL_FIELDS + ("from_pretrained",))
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`model.{key}` must be a finite number, got {value!r}.")
    pretrained = model.get("from_pretrained")
    if pretrained is not None:
        if not os.path.isfile(os.path.join(str(pretrained), "config.json")):
            raise ConfigError(f"`model.from_pretrained`: {pretrained!r} is not a checkpoint folder (no config.json).")
        return None
    try:
        return SfrnnConfig(vocab_size=2, **model)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: {error}") from error


__all__ = ["ConfigError", "DataConfig", "TrainingConfig", "LoraSection", "ExperimentConfig", "load_config",
           "shipped_configs", "trainer_default", "check_model_section"]
