"""The training configuration: a YAML file (a path, or a shipped config's name) of four sections, plus `section.key=value`
overrides; checked whole before any data is read. `model`: SfrnnConfig fields (the tokenizer gives the vocabulary and
special tokens) or `from_pretrained: <path>`; `data`: DataConfig; `training`: any `transformers.TrainingArguments`
field by its own name and TrainingConfig, the package's own (`training_section.py`); `lora`: LoraSection. Every
section is a strict dataclass with types, choices and ranges on its fields, read by `config_reading.checked`.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError

from ..configuration_sfrnn import POSITIVE, SfrnnConfig, fold_feedback_type, in_range
from ..lora_targets import check_lora_targets, recurrent_lora_parameters
from .config_reading import (ConfigError, apply_override, checked, parse_overrides, read_yaml, resolve_config_path,
                             shipped_configs, strict_section, unknown_key)
from .data import DATASETS, SEQUENCE_LAYOUTS, TOKENIZERS, check_source
from .training_section import (TRAINER_DEFAULTS, TrainingConfig, canonical_override, canonical_training,
                               read_training_section, trainer_default)


@strict
@dataclass
class DataConfig:
    dataset: Literal[DATASETS] = "ptb"  # ptb_char: the standard character-level PTB; text: local files
    sequences: Literal[SEQUENCE_LAYOUTS] = "sentence"  # one line a sequence, padded | concatenated, fixed chunks
    max_length: int = validated_field(in_range(2), default=65)  # sentence: truncation incl. <bos>/<eos>; stream: chunk
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
class LoraSection:
    enabled: bool = False
    r: int = validated_field(POSITIVE, default=8)
    alpha: int = validated_field(POSITIVE, default=16)
    target_parameters: list[str] | None = None  # None: the cell's recurrent matrices (`recurrent_lora_parameters`)
    target_modules: list[str] = field(default_factory=list)
    merge_at_end: bool = True  # also save the merged model (an ordinary sfrnn checkpoint) in output_dir/merged

    def parameters_for(self, cell_type: str) -> list[str]:
        """The recurrent parameters this section adapts in a `cell_type` model (by default the cell's matrices)."""
        return list(recurrent_lora_parameters(cell_type) if self.target_parameters is None else self.target_parameters)

    def for_cell(self, cell_type: str) -> "LoraSection":
        """This section with its targets checked against a `cell_type` model and the default made explicit (written
        to the run's experiment.yaml)."""
        section = dataclasses.replace(self, target_parameters=self.parameters_for(cell_type))
        try:
            check_lora_targets(section.target_modules, section.target_parameters, cell_type)
        except ValueError as error:
            raise ConfigError(f"lora.{error}") from None
        if not section.target_parameters and not section.target_modules:
            raise ConfigError("LoRA needs at least one of `lora.target_parameters` and `lora.target_modules`.")
        return section


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


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (a path or a shipped name; None: all defaults), apply `section.key=value` overrides and check
    everything that can be checked without data. Raises `ConfigError` naming the bad key, value or path."""
    source = resolve_config_path(name_or_path) if name_or_path is not None else ""
    raw = read_yaml(source) if source else {}
    spelled = {}  # training key: the name the config gave it (for errors)
    if isinstance(raw.get("training"), dict):
        raw["training"] = canonical_training(raw["training"], spelled)
    for path, value in parse_overrides(list(overrides)):
        apply_override(raw, canonical_override(path, spelled) if path[0] == "training" else path, value)
    for key in raw:
        if key not in ("model", "data", "training", "lora"):
            raise unknown_key("config", key, ("model", "data", "training", "lora"))
    model, _ = check_model_section(raw.get("model"))
    training, trainer_args = read_training_section(raw.get("training"), spelled)
    config = ExperimentConfig(model=model, data=strict_section(DataConfig, "data", raw.get("data")),
                              training=training, trainer_args=trainer_args,
                              lora=strict_section(LoraSection, "lora", raw.get("lora")), source=source)
    if config.lora.enabled:
        if model.get("from_pretrained") is None:
            raise ConfigError("LoRA fine-tunes a trained checkpoint: set `model.from_pretrained` (or pass --lora PATH).")
        try:
            cell_type = SfrnnConfig.from_pretrained(model["from_pretrained"]).cell_type
        except (OSError, ValueError, StrictDataclassError) as error:
            raise ConfigError(f"`model.from_pretrained`: {model['from_pretrained']!r}: {error}") from None
        config.lora = config.lora.for_cell(cell_type)
    return config


MODEL_DERIVED_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
MODEL_FIELDS = tuple(name for name in SfrnnConfig.__annotations__ if name not in MODEL_DERIVED_FIELDS)


def check_model_section(values) -> tuple[dict, SfrnnConfig | None]:
    """The model section with each value checked against its `SfrnnConfig` field (an earlier config's `feedback_type`
    folded into `gradient_mode`), and the `SfrnnConfig` it makes with a placeholder vocabulary (None with
    `from_pretrained`, whose folder must hold a config.json)."""
    if not isinstance(values or {}, dict):
        raise ConfigError(f"Section `model` must be a mapping, got {values!r}.")
    try:
        values = fold_feedback_type(values or {})
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    model = {}
    for key, value in values.items():
        if key in MODEL_DERIVED_FIELDS:
            raise ConfigError(f"`model.{key}` is set from the tokenizer; remove it from the config.")
        if key != "from_pretrained" and key not in MODEL_FIELDS:
            raise unknown_key("model", key, MODEL_FIELDS + ("from_pretrained",))
        model[key] = value if key == "from_pretrained" else checked(
            f"model.{key}", value, SfrnnConfig.__annotations__[key], SfrnnConfig.__validators__[key][1:])
    pretrained = model.get("from_pretrained")
    if pretrained is not None:
        if not os.path.isfile(os.path.join(str(pretrained), "config.json")):
            raise ConfigError(f"`model.from_pretrained`: {pretrained!r} is not a checkpoint folder (no config.json).")
        return model, None
    try:
        return model, SfrnnConfig(vocab_size=2, **model)
    except StrictDataclassError as error:
        raise ConfigError(f"model: {error.__cause__}") from None


__all__ = ["ConfigError", "DataConfig", "TrainingConfig", "LoraSection", "ExperimentConfig", "load_config",
           "shipped_configs", "trainer_default", "check_model_section"]
