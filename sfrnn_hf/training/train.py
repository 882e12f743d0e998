"""Train (or LoRA-fine-tune) an sfrnn language model with `transformers.Trainer`, from a YAML config.

    sfrnn-train ptb_gru_1x256                                  # a shipped config (sfrnn_hf/training/configs/)
    sfrnn-train my.yaml model.gradient_mode=bptt training.num_train_epochs=3
    sfrnn-train ptb_gru_1x256 --set training.learning_rate=5e-4 --output-dir runs/x
    sfrnn-train ptb_gru_1x256 --lora runs/ptb/ --output-dir runs/ptb-lora
    torchrun --nproc_per_node 4 -m sfrnn_hf.training.train ptb_gru_3x1024       # DDP; same global batch
    accelerate launch --num_processes 4 -m sfrnn_hf.training.train ptb_gru_3x1024

Reads top to bottom: config -> tokenizer and data -> model (-> LoRA) -> Trainer (plain Adam with coupled weight decay,
StepLR or warm-up + cosine, exact perplexity) -> best checkpoint, curves and results in `training.output_dir`.

Outputs in `output_dir`: the best model and its tokenizer (`AutoModelForCausalLM` / `AutoTokenizer` load them; with
LoRA: the adapter, plus the merged model in `merged/`), `checkpoint-*/` (resumable), `log_history.jsonl` (every logged
point of the curves), `results.json` (best validation and test perplexity), `experiment.yaml` (the resolved config).
"""

import argparse
import contextlib
import copy
import errno
import functools
import json
import math
import os
import shutil
import sys

import torch
import yaml
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import is_tensorboard_available
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging

from ..configuration_sfrnn import SfrnnConfig
from ..backends_sfrnn import resolve_dsf_backend
from ..modeling_sfrnn import CalibratedFeedbackCallback, SfrnnForCausalLM
from ..recurrent_sfrnn import SfrnnRecurrentLayer
from .checkpoints import damage, newest_intact, write_atomically, write_manifest
from .config import (
    ConfigError,
    ExperimentConfig,
    check_model_section,
    load_config,
    shipped_configs,
)
from .data import (CausalLMCollator, DataError, build_tokenizer, is_character_level, load_raw_text, prepare_data,
                   text_file_digests)
from .gradient_schedule import GradientModeSchedule, parse_schedule
from .run_folder import (OutputDirError, RunLock, changed_settings, check_writable, clear, earlier_run, is_secret,
                         redact_secrets)

EXPERIMENT_FILE = "experiment.yaml"
DATA_DIGESTS_FILE = "data_sha256.json"  # in each checkpoint: the content of the local data files it was trained on


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stopped before the update, the last checkpoint kept."""


def experiment_yaml(experiment: ExperimentConfig) -> str:
    """The resolved settings as written beside a run and each checkpoint, secrets redacted."""
    return yaml.safe_dump(redact_secrets(experiment.to_dict()), sort_keys=False)

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


def build_model(model_section: dict, tokenizer) -> SfrnnForCausalLM:
    """A fresh model from the config's model fields (vocabulary and special tokens from the tokenizer), or the
    checkpoint `from_pretrained` names, whose fields must agree with any given (gradient_mode may change)."""
    fields = {k: v for k, v in model_section.items() if k != "from_pretrained"}
    pretrained = model_section.get("from_pretrained")
    if pretrained is None:
        config = SfrnnConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **fields,
        )
        return SfrnnForCausalLM(config)
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    if not isinstance(model, SfrnnForCausalLM):
        raise ConfigError(f"`model.from_pretrained`: {pretrained!r} holds a {type(model).__name__}, not an sfrnn model.")
    for key, value in fields.items():
        if key == "gradient_mode":
            model.config.gradient_mode = value
        elif getattr(model.config, key) != value:
            raise ConfigError(
                f"`model.{key}` is {value!r} but the checkpoint {pretrained!r} has {getattr(model.config, key)!r}; "
                "remove it from the config or make it match."
            )
    if model.config.vocab_size != len(tokenizer):
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the checkpoint {pretrained!r} a vocabulary of "
            f"{model.config.vocab_size}: use the checkpoint's own tokenizer."
        )
    return model


def lora_config(section, cell_type: str):
    """PEFT `LoraConfig` for an sfrnn model of `cell_type`.

    - `target_parameters`: the recurrent matrices `weight_ih` / `weight_hh` (by default those the cell has), raw
      parameters read inside `SfrnnRecurrentLayer.forward`; PEFT parametrizes them while that forward runs, so the
      adapted weights drive the recurrence itself (the fused forward, the DSF one-step gradients and generation alike).
    - `target_modules`: ordinary `nn.Linear`s: `output_projection` (after the recurrence; pre-norm blocks and LSTMs
      exposing `[h, c]`), `up_proj` / `down_proj` (pre-norm MLP), `lm_head`.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=0.0,  # PEFT's parameter LoRA cannot apply dropout
        target_modules=list(section.target_modules),
        target_parameters=[name if "." in name else f"recurrent.{name}" for name in section.parameters_for(cell_type)],
        task_type="CAUSAL_LM",
    )


def apply_lora(model, section):
    """`model` wrapped by PEFT with the LoRA `section` describes; only the adapters train."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(section, model.config.cell_type))


def check_bf16_autocast(config: SfrnnConfig, device: str) -> None:
    """Run one tiny recurrent layer of `config`'s cell under bf16 autocast: a training forward and backward in its
    gradient mode, and a no-grad forward (evaluation, generation). Fails before training, with the reason, where the
    cell cannot run under autocast (torch 2.13's fused LSTM has no bf16 oneDNN kernel on CPUs without native bf16)."""
    probe = SfrnnConfig(vocab_size=2, hidden_size=8, cell_type=config.cell_type, gradient_mode=config.gradient_mode)
    layer = SfrnnRecurrentLayer(probe).to(device)
    with torch.no_grad():
        for tensor in list(layer.parameters()) + list(layer.buffers()):
            tensor.uniform_(0.0, 0.3)
    inputs = torch.randn(2, 3, 8, device=device, requires_grad=True)
    try:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            outputs, _ = layer(inputs)
            with torch.no_grad():
                layer(inputs)
        outputs.float().sum().backward()
    except RuntimeError as error:
        raise ConfigError(
            f"`training.bf16: true` but the {config.cell_type!r} recurrent layer fails under bf16 autocast on "
            f"{device}: {str(error).splitlines()[0]} Use bf16: false (or another cell) on this device."
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Trainer: optimiser, schedule, evaluation
# ---------------------------------------------------------------------------------------------------------------------


def token_nll_and_count(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: summed next-token NLL and number of predicted tokens (labels shifted, -100 ignored).
    logits `(batch, time, vocab)`, labels `(batch, time)` -> `(batch, 2)`."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return torch.stack([nll.sum(dim=1), (labels != -100).sum(dim=1).to(nll.dtype)], dim=1)


def perplexity_metrics(eval_prediction, character_level: bool = False) -> dict:
    """Corpus perplexity `exp(total NLL / total predicted tokens)` (not a mean of per-batch perplexities), `inf` when
    that exceeds a float (a huge but finite loss); with `character_level` (a token is a character) also bits per
    character, `total NLL / total tokens / ln 2`."""
    stats = eval_prediction.predictions
    total_nll, total_tokens = float(stats[:, 0].sum()), float(stats[:, 1].sum())
    mean_nll = total_nll / max(total_tokens, 1.0)
    try:
        perplexity = math.exp(mean_nll)
    except OverflowError:
        perplexity = math.inf
    metrics = {"perplexity": perplexity, "tokens": total_tokens}
    if character_level:
        metrics["bits_per_character"] = mean_nll / math.log(2)
    return metrics


class SfrnnTrainer(Trainer):
    """The Trainer with the paper's optimiser and PTB schedule.

    - plain Adam with COUPLED weight decay (L2 added to the gradient, `torch.optim.Adam(weight_decay=...)`, not
      AdamW), on every trainable parameter;
    - `scheduler: step`: StepLR in optimizer steps, decaying by `step_gamma` every `step_every` of the run (the paper:
      every 10 of 30 epochs, so a shorter budget decays at the same fractions);
    - evaluation without a recurrent-state cache.
    """

    def __init__(self, *args, experiment: ExperimentConfig, data_digests: dict[str, str] | None = None, **kwargs):
        self.experiment = experiment
        self.data_digests = data_digests or {}  # `data.text_file_digests`, written into each checkpoint
        training_args = kwargs["args"]
        adam = {"lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
                "eps": training_args.adam_epsilon}
        super().__init__(*args, optimizer_cls_and_kwargs=(torch.optim.Adam, adam), **kwargs)
        self.add_callback(CalibratedFeedbackCallback())

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, _ in model.named_parameters()]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        training = self.experiment.training
        if self.lr_scheduler is None and training.scheduler == "step":
            step_size = max(1, math.ceil(num_training_steps * training.step_every - 1e-9))  # decays strictly inside the run
            self.lr_scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer or self.optimizer, step_size=step_size, gamma=training.step_gamma
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
        """The Trainer's evaluation during training; a non-finite evaluation loss stops training (`TrainingDiverged`)
        before this step's checkpoint is saved."""
        metrics = super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler)
        loss = metrics.get("eval_loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(self._diverged(self.state.global_step, f"the evaluation loss is {loss}",
                                                  after_update=True))
        return metrics

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, sealed by its manifest before any older checkpoint is rotated away: a kill at any
        point leaves an intact checkpoint to resume from. Weights that are not finite are never saved: training stops
        (`TrainingDiverged`), the last checkpoint kept."""
        bad = next((name for name, p in self.model.named_parameters() if not bool(p.detach().isfinite().all())), None)
        if bad is not None:
            raise TrainingDiverged(self._diverged(self.state.global_step, f"the weight {bad} is not finite",
                                                  after_update=True))
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # the Trainer's rotation waits for the seal
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
            write_atomically(os.path.join(folder, EXPERIMENT_FILE), experiment_yaml(self.experiment))
            write_atomically(os.path.join(folder, DATA_DIGESTS_FILE), json.dumps(self.data_digests, indent=1))
            write_manifest(folder)  # sealed last: a checkpoint without its manifest was not completely written
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._apply_optimizer_settings()

    def _apply_optimizer_settings(self) -> None:
        """After a resume restored the checkpoint's optimizer and schedule: this run's `learning_rate`, `weight_decay`,
        `adam_beta1/2` and `adam_epsilon`. The schedule keeps its position: each group's learning rate becomes the new base
        rate times the schedule's current factor, so `experiment.yaml` records what runs."""
        args = self.args
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's wrapper holds it
        for index, group in enumerate(self.optimizer.param_groups):
            factor = group["lr"] / scheduler.base_lrs[index] if scheduler.base_lrs[index] else 1.0
            group.update(lr=args.learning_rate * factor, initial_lr=args.learning_rate,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            if group["params"]:  # every trainable parameter decays (`get_decay_parameter_names`)
                group["weight_decay"] = args.weight_decay
        scheduler.base_lrs = [args.learning_rate] * len(scheduler.base_lrs)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if not getattr(optimizer, "_sfrnn_divergence_check", False):
            optimizer.register_step_pre_hook(self._stop_if_not_finite)
            optimizer._sfrnn_divergence_check = True
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).reshape(())
        self._losses_finite = finite if getattr(self, "_losses_finite", None) is None else self._losses_finite & finite
        return loss

    def _stop_if_not_finite(self, optimizer, *args, **kwargs):
        """Before every update (one host sync per optimizer step): every micro-batch's loss and every gradient
        finite, else `TrainingDiverged` naming the step and the first bad tensor."""
        step = self.state.global_step + 1
        losses_finite, self._losses_finite = getattr(self, "_losses_finite", None), None
        if losses_finite is not None and not bool(losses_finite):
            raise TrainingDiverged(self._diverged(step, "the training loss is not finite"))
        named = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        if named and not bool(torch.stack([grad.isfinite().all() for _, grad in named]).all()):
            bad = next(name for name, grad in named if not bool(grad.isfinite().all()))
            raise TrainingDiverged(self._diverged(step, f"the gradient of {bad} is not finite"))

    def _diverged(self, step: int, what: str, after_update: bool = False) -> str:
        intact, _ = newest_intact(self.args.output_dir)
        kept = f"the last checkpoint, {intact}, is kept" if intact else "no checkpoint was written yet"
        stopped = "Stopped before saving this step" if after_update else "Stopped before the update"
        return (f"Training diverged at step {step}: {what}. {stopped}; {kept}. Lower "
                f"training.learning_rate (now {self.args.learning_rate}), or check the data and inputs.")

    def finish_from(self, checkpoint: str) -> None:
        """The state of a run whose last checkpoint is `checkpoint`, without training another step: its trainer
        state, and its best model (when validation chose one) or its last weights."""
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best is not None and os.path.isdir(best):
            self._load_best_model()
        else:
            self._load_from_checkpoint(checkpoint)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super().prediction_step(model, {**inputs, "use_cache": False}, prediction_loss_only, ignore_keys)


class JsonLogCallback(TrainerCallback):
    """Appends every log (training loss, learning rate, grad norm, evaluation perplexity) to `log_history.jsonl`."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def _report_to(value):
    if value == "auto":
        return ["tensorboard"] if is_tensorboard_available() else "none"
    return value


def training_arguments(experiment: ExperimentConfig, has_validation: bool, world_size: int) -> TrainingArguments:
    """The `TrainingArguments` of a run, built by `HfArgumentParser`: defaults for running an sfrnn model, then the
    fields the config's `training` section sets, then the ones its `TrainingConfig` keys derive
    (`training_section.SET_BY`)."""
    training, given = experiment.training, experiment.trainer_args
    accumulation, eval_strategy = given.get("gradient_accumulation_steps", 1), given["eval_strategy"]
    per_step = world_size * accumulation
    if training.batch_size % per_step:
        raise ConfigError(
            f"`training.batch_size` ({training.batch_size}) must be a multiple of world size x accumulation steps "
            f"({world_size} x {accumulation})."
        )
    per_device = training.batch_size // per_step
    evaluate = has_validation and eval_strategy != "no"
    cosine = training.scheduler == "warmup_cosine"
    defaults = dict(  # the config's `training` section may change these
        save_strategy=eval_strategy if evaluate else "epoch",
        save_steps=given.get("eval_steps"),
        # Without CUDA, multi-process (gloo) and bf16 autocast need accelerate's explicit CPU mode.
        use_cpu=not torch.cuda.is_available() and (given.get("bf16", False) or world_size > 1),
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every parameter gets a gradient at every step, in every mode
        remove_unused_columns=False,  # the collator builds the model's inputs
    )
    derived = dict(  # the fields `training_section.SET_BY` names, and the ones whose config value means more
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=given["per_device_eval_batch_size"] or per_device,
        lr_scheduler_type="cosine_with_min_lr" if cosine else "constant",  # `step`: SfrnnTrainer.create_scheduler
        lr_scheduler_kwargs={"min_lr_rate": training.min_lr_ratio} if cosine else {},
        warmup_steps=training.warmup_ratio if cosine else 0,  # a float below 1: a fraction of the run
        eval_strategy=eval_strategy if evaluate else "no",
        load_best_model_at_end=evaluate,
        metric_for_best_model="perplexity" if evaluate else None,
        greater_is_better=False if evaluate else None,
        report_to=_report_to(given["report_to"]),
    )
    kwargs = {**defaults, **given, **derived}
    if kwargs.get("save_strategy") == "steps" and kwargs.get("save_steps") is None:
        kwargs["save_steps"] = 500
    try:
        return HfArgumentParser(RunTrainingArguments).parse_dict(kwargs)[0]
    except ValueError as error:  # TrainingArguments' own checks (combinations of fields)
        raise ConfigError(f"training: {error}") from None


class RunTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose pickled form (`training_args.bin`, in every checkpoint) leaves out the Hub token."""

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in state:
            if is_secret(name):  # `hub_token`, of any type (YAML reads an all-digit token as an int)
                state[name] = None
        return state


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _load_or_build_tokenizer(experiment: ExperimentConfig, resume: str | None):
    """The checkpoint's tokenizer when fine-tuning; the resumed checkpoint's own (else its run's `<run>/tokenizer`) when
    resuming, so a resumed run sees the very same vocabulary wherever the checkpoint lies; otherwise one built for this
    run's data settings."""
    pretrained = experiment.model.get("from_pretrained")
    if pretrained is not None and os.path.isfile(os.path.join(pretrained, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(pretrained)
    if resume is not None:  # the checkpoint's own (the Trainer saves it), else its run's
        for folder in (resume, os.path.join(os.path.dirname(os.path.abspath(resume)), "tokenizer")):
            if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
                return AutoTokenizer.from_pretrained(folder)
    return build_tokenizer(experiment.data, load_raw_text(experiment.data))


def resolve_resume(requested, output_dir: str, main_process: bool = True) -> str | None:
    """The checkpoint a resume continues from, or None to start from step 0.

    `True`: the newest intact checkpoint in `output_dir`; newer, damaged ones are named in a warning and moved aside to
    `skipped-checkpoint-<step>` (never deleted: the run rewrites `checkpoint-<step>`). A run that never completed a
    checkpoint starts over, with a warning. A path must be intact, and `output_dir` must be its own run's folder or
    hold no run. Raises `ConfigError` naming what is wrong when there is no run to resume.
    """
    if not requested:
        return None
    if requested is True:
        checkpoint, skipped = newest_intact(output_dir)
        if checkpoint is None and not earlier_run(output_dir) and not skipped:
            raise ConfigError(f"Nothing to resume in {output_dir}: it holds no run. Run without --resume to start one.")
        for folder, reason in skipped:
            kept = _set_aside(folder) if main_process else folder
            logger.warning(f"Skipping the damaged checkpoint {folder}: {reason}; it is kept as {kept}. "
                           f"{f'Resuming from {checkpoint}' if checkpoint else 'No intact checkpoint: starting over'}.")
        if checkpoint is None:
            logger.warning(f"The run in {output_dir} has no intact checkpoint: it starts over from step 0.")
        return checkpoint
    reason = damage(requested) if os.path.isdir(requested) else f"{requested} is not a folder"
    if reason is not None:
        raise ConfigError(f"Cannot resume from {requested}: {reason}.")
    own_folder = os.path.dirname(os.path.abspath(requested))
    if not _same_folder(own_folder, output_dir) and earlier_run(output_dir):
        raise ConfigError(
            f"Cannot resume {requested} into {output_dir}: that folder holds another run "
            f"({', '.join(earlier_run(output_dir)[:3])}). Resume into the checkpoint's own run folder ({own_folder}) "
            "or into an empty `training.output_dir`.")
    return requested


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _set_aside(checkpoint: str) -> str:
    """Rename a skipped `checkpoint-<step>` to a free `skipped-checkpoint-<step>[.n]` beside it (outside the
    Trainer's rotation, which globs `checkpoint-*`); returns the new path."""
    parent, name = os.path.split(checkpoint)
    target, n = os.path.join(parent, f"skipped-{name}"), 1
    while os.path.exists(target):
        target, n = os.path.join(parent, f"skipped-{name}.{n}"), n + 1
    os.rename(checkpoint, target)
    return target


def check_source_outside_output(experiment: ExperimentConfig, output_dir: str) -> None:
    """`model.from_pretrained` (the base of a LoRA or fine-tuning run) must lie outside `output_dir` and not contain
    it: the run would overwrite or delete its own source."""
    source = experiment.model.get("from_pretrained")
    if source is None or not os.path.isdir(source):
        return
    source, output = os.path.realpath(source), os.path.realpath(output_dir)
    if os.path.commonpath([source, output]) in (source, output):
        raise ConfigError(f"`model.from_pretrained` {experiment.model['from_pretrained']!r} and `training.output_dir` "
                          f"{output_dir!r} overlap: the run would overwrite the model it starts from. Choose another "
                          "output_dir.")


def settings_changed_since_start(experiment: ExperimentConfig, folder) -> list[str]:
    """`changed_settings` from the run whose resolved config `folder/experiment.yaml` records (none there: []) to
    `experiment`."""
    path = os.path.join(folder, EXPERIMENT_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return changed_settings(yaml.safe_load(handle) or {}, experiment.to_dict())


def data_changed_since(checkpoint: str, digests: dict[str, str]) -> list[str]:
    """Each local data file whose content differs from the one `checkpoint` was trained on (its `data_sha256.json`;
    none recorded: [])."""
    path = os.path.join(checkpoint, DATA_DIGESTS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        before = json.load(handle)
    return [f"data file {name}: its content changed (sha256 {before.get(name, '<absent>')[:12]} -> "
            f"{digests.get(name, '<absent>')[:12]})" for name in sorted(before | digests)
            if before.get(name) != digests.get(name)]


def check_optimizer_state(checkpoint: str) -> None:
    """A checkpoint to continue training from holds the optimizer and schedule state (`save_only_model` writes none:
    Adam would restart from zero moments); else `ConfigError` naming it."""
    missing = [name for name in (OPTIMIZER_NAME, SCHEDULER_NAME) if not os.path.isfile(os.path.join(checkpoint, name))]
    if missing:
        raise ConfigError(f"Cannot resume from {checkpoint}: it holds no {' or '.join(missing)} (saved with "
                          "`save_only_model`?), so the optimizer would start over. Fine-tune its weights instead "
                          f"(model.from_pretrained={checkpoint}) in a new output_dir.")


def check_same_architecture(model, checkpoint: str, changes: list[str]) -> None:
    """The model this run builds has the parameter names and shapes of the `checkpoint` it resumes; else `ConfigError`
    naming the differing tensors and the model settings that changed (rather than a size mismatch inside torch)."""
    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(path):  # a LoRA checkpoint holds its adapter only
        return
    with safe_open(path, "pt") as handle:
        saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    built = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    differ = sorted(name for name in saved.keys() | built.keys() if saved.get(name) != built.get(name))
    if differ:
        model_changes = [change for change in changes if change.startswith("model.")] or ["(none recorded)"]
        raise ConfigError(f"Cannot resume from {checkpoint}: this run builds another architecture ("
                          f"{', '.join(f'{name} {saved.get(name)} -> {built.get(name)}' for name in differ[:3])}). "
                          f"Model settings changed: {'; '.join(model_changes)}. Resume with the checkpoint's settings "
                          "or start a new run.")


def _finished(checkpoint: str, settings_changed: bool) -> bool:
    """Whether `checkpoint` ends its run: its step reached the steps planned by the same settings."""
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
        state = json.load(handle)
    return not settings_changed and state["global_step"] >= state.get("max_steps", float("inf"))


def _test_perplexity_missing(experiment: ExperimentConfig, recorded: dict) -> bool:
    """Whether a finished run's `results.json` lacks the test perplexity that `training.evaluate_test` now asks for
    and the data has a test split."""
    data = experiment.data
    has_test = data.dataset != "text" or bool(data.test_files)
    return experiment.training.evaluate_test and has_test and recorded.get("test_perplexity") is None


def _as_json(results: dict) -> str:
    """`results` as strict JSON: a non-finite number becomes null."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in results.items()}
    return json.dumps(clean, indent=2, allow_nan=False)


def _claim_output_dir(experiment: ExperimentConfig, output_dir: str, main_process: bool) -> tuple[str | None, list]:
    """Make `output_dir` this run's: `(checkpoint to resume or None, settings changed since that checkpoint)`.

    A resume compares its settings with the ones the checkpoint was trained with (a warning names each change); a
    resumed run with no intact checkpoint starts over in a folder cleared of that run's files; a new run into a folder
    holding another run is refused, or clears it first with `training.overwrite_output_dir`. Only a run's own files
    are ever deleted: a folder holding anything else is refused (`run_folder.clear`)."""
    training = experiment.training
    resume = resolve_resume(training.resume_from_checkpoint, output_dir, main_process)
    if resume:
        changes = settings_changed_since_start(experiment, resume)
        if changes:
            logger.warning(f"Resuming from {resume} with settings that differ from the ones it was trained with; "
                           f"the updates after the checkpoint will not be the ones that run would have made: "
                           f"{'; '.join(changes)}")
        return resume, changes
    found = earlier_run(output_dir)
    if found and training.resume_from_checkpoint is not True and not training.overwrite_output_dir:
        raise ConfigError(
            f"{output_dir} holds an earlier run ({', '.join(found[:4])}). Continue it with --resume "
            f"(training.resume_from_checkpoint=true), start over with --overwrite "
            f"(training.overwrite_output_dir=true: deletes that run's files), or choose another output_dir.")
    if _finished_without_checkpoint(experiment, output_dir):
        return None, []
    if main_process and (found or training.resume_from_checkpoint is True):
        clear(output_dir, "--overwrite" if training.overwrite_output_dir else "starting the run over")
    return None, []


def _finished_without_checkpoint(experiment: ExperimentConfig, output_dir: str) -> bool:
    """Whether a resume meets a finished run (its `results.json`) that kept no intact checkpoint: it resumes as
    finished. A changed setting cannot apply to it: `ConfigError` naming each."""
    if experiment.training.resume_from_checkpoint is not True or not os.path.isfile(
            os.path.join(output_dir, "results.json")):
        return False
    changes = settings_changed_since_start(experiment, output_dir)
    if changes:
        raise ConfigError(f"The run in {output_dir} is finished and kept no checkpoint to continue from, so these "
                          f"changes cannot apply: {'; '.join(changes)}. Resume without them, start over with "
                          "--overwrite, or choose another output_dir.")
    return True


def run(experiment: ExperimentConfig, callbacks=None):
    """Train as `experiment` says. Returns `(trainer, results)`; `results` is also written to `results.json`.

    Before any data is read: the output folder is checked writable and locked for this run; a new run into a folder
    holding another run is refused (unless `training.overwrite_output_dir`, which clears it first); a resume finds
    its newest intact checkpoint and compares its settings with the ones that checkpoint was trained with. A resumed
    finished run trains no further step. A non-finite loss or gradient stops training (`TrainingDiverged`) before
    the update, keeping the last checkpoint.
    """
    _, model_check = check_model_section(experiment.model)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_check is not None:
        try:  # a backend this device cannot run fails here, before the output folder is claimed
            resolve_dsf_backend(model_check.dsf_backend, torch.device(device), model_check.cell_type)
        except ValueError as error:
            raise ConfigError(f"`model.dsf_backend`: {error}") from None
    training = experiment.training
    has_validation = experiment.data.dataset != "text" or bool(experiment.data.validation_files)
    args = training_arguments(experiment, has_validation, world_size)
    if args.bf16 and model_check is not None:
        check_bf16_autocast(model_check, device)
    if args.fp16 and device != "cuda":
        raise ConfigError(f"`training.fp16: true` needs CUDA; on {device} it would silently train in fp32. Use "
                          "`training.bf16: true` (bf16 autocast runs on CPU) or fp32.")
    main_process = args.process_index == 0
    check_source_outside_output(experiment, args.output_dir)
    check_writable(args.output_dir)
    with RunLock(args.output_dir) if main_process else contextlib.nullcontext():
        results_path = os.path.join(args.output_dir, "results.json")
        resume, changes = _claim_output_dir(experiment, args.output_dir, main_process)
        finished = resume is not None and _finished(resume, bool(changes))
        recorded = {}
        if (finished or resume is None and training.resume_from_checkpoint is True) and os.path.isfile(results_path):
            # a finished run; without a checkpoint `_claim_output_dir` cleared any unfinished one's `results.json`
            logger.info(f"The run in {args.output_dir} is finished (checkpoint {resume}): nothing to train.")
            with open(results_path) as handle:
                recorded = json.load(handle)
            if not (finished and _test_perplexity_missing(experiment, recorded)):
                return None, recorded

        if resume is not None and not finished:
            check_optimizer_state(resume)
        with args.main_process_first(desc="tokenizer and data", local=False):
            tokenizer = _load_or_build_tokenizer(experiment, resume)
            data = prepare_data(experiment.data, tokenizer)
            data_digests = text_file_digests(experiment.data)
        if resume is not None:
            for change in data_changed_since(resume, data_digests):
                logger.warning(f"Resuming from {resume} on other data than it was trained on: {change}.")

        set_seed(args.seed)
        model = build_model(experiment.model, tokenizer)
        if args.bf16 and model_check is None:
            check_bf16_autocast(model.config, device)
        if resume is not None and not experiment.lora.enabled:
            check_same_architecture(model, resume, changes)
        if experiment.lora.enabled:
            model = apply_lora(model, experiment.lora)
        schedule = []
        if training.gradient_mode_schedule:
            base = model.get_base_model() if experiment.lora.enabled else model
            schedule = [GradientModeSchedule(base.config.gradient_mode, parse_schedule(training.gradient_mode_schedule))]
        if main_process:  # the run really starts: its settings and vocabulary go beside its checkpoints
            tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))
            write_atomically(os.path.join(args.output_dir, EXPERIMENT_FILE), experiment_yaml(experiment))

        trainer = SfrnnTrainer(
            model=model,
            args=args,
            train_dataset=data.splits["train"],
            eval_dataset=data.splits.get("validation") if args.eval_strategy != "no" else None,
            data_collator=CausalLMCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            compute_metrics=functools.partial(perplexity_metrics, character_level=is_character_level(experiment.data)),
            preprocess_logits_for_metrics=token_nll_and_count,
            callbacks=[JsonLogCallback(os.path.join(args.output_dir, "log_history.jsonl"))] + schedule
            + list(callbacks or []),
            experiment=experiment,
            data_digests=data_digests,
        )
        if finished:  # killed after its last checkpoint, or asked for a test perplexity: no further step
            trainer.finish_from(resume)
            results = {**recorded, "global_step": trainer.state.global_step}
        else:
            train_output = trainer.train(resume_from_checkpoint=resume)
            results = {
                "global_step": train_output.global_step,
                "train_loss": train_output.training_loss,
                "train_runtime_s": train_output.metrics.get("train_runtime"),
            }
        trainer.save_model(args.output_dir)  # the best model when validation ran (load_best_model_at_end)
        results["best_checkpoint"] = trainer.state.best_model_checkpoint
        if schedule and schedule[0].steps_per_epoch is not None:  # (None: a finished run, no step taken here)
            results["gradient_mode_schedule"] = schedule[0].resolved()
        for split in ("validation", "test"):
            if split in data.splits and (split == "validation" or training.evaluate_test):
                metrics = trainer.evaluate(eval_dataset=data.splits[split], metric_key_prefix=split)
                for name in ("perplexity", "bits_per_character"):
                    if f"{split}_{name}" in metrics:
                        results[f"{split}_{name}"] = metrics[f"{split}_{name}"]
        if experiment.lora.enabled and experiment.lora.merge_at_end and main_process:
            # merge_and_unload rewrites the model it is called on: merge a copy, the trainer keeps its adapters
            merged = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).merge_and_unload()
            merged.save_pretrained(os.path.join(args.output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
            results["merged_model"] = os.path.join(args.output_dir, "merged")
        if main_process:
            write_atomically(results_path, _as_json(results))
        return trainer, results


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="sfrnn-train",
        description="Train an sfrnn language model (exact BPTT, DSF or FT-BPTT) with the transformers Trainer.",
        epilog="Overrides: section.key=value, value read as YAML, e.g. model.gradient_mode=bptt training.learning_rate=5e-4 "
        "data.max_train_samples=1000. Sections: model, data, training, lora.",
    )
    parser.add_argument("config", nargs="?", help="YAML config file, or the name of a shipped config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="section.key=value",
                        help="a config override (repeatable)")
    parser.add_argument("--lora", metavar="CHECKPOINT", help="LoRA-fine-tune this trained checkpoint")
    parser.add_argument("--output-dir", help="same as training.output_dir=...")
    parser.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                        help="resume from the latest checkpoint in output_dir, or from CHECKPOINT")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir holding an earlier run (deletes that run's files only)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, cli = parse_args(argv)
    if cli.list_configs:
        print("\n".join(shipped_configs()))
        return 0
    overrides = list(cli.overrides) + list(cli.set_overrides)
    if cli.output_dir:
        overrides.append(f"training.output_dir={cli.output_dir}")
    if cli.lora:
        overrides += ["lora.enabled=true", f"model.from_pretrained={cli.lora}"]
    if cli.resume is not None:
        overrides.append(f"training.resume_from_checkpoint={cli.resume}")
    if cli.overwrite:
        overrides.append("training.overwrite_output_dir=true")
    try:
        experiment = load_config(cli.config, overrides)
        if cli.lora:  # the checkpoint defines the architecture: keep only the mode from the config's model section
            experiment.model = {k: v for k, v in experiment.model.items() if k in ("from_pretrained", "gradient_mode")}
        if cli.print_config:
            print(yaml.safe_dump(redact_secrets(experiment.to_dict()), sort_keys=False))
            return 0
        trainer, results = run(experiment)
        trainer.end()  # the trackers finish and, under torchrun, the process group is left before exit
    except (ConfigError, OutputDirError, DataError, FileNotFoundError) as error:
        parser.exit(2, f"sfrnn-train: error: {error}\n")
    except TrainingDiverged as error:
        parser.exit(3, f"sfrnn-train: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "sfrnn-train: interrupted. Every sealed checkpoint is intact: continue with --resume.\n")
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        parser.exit(2, f"sfrnn-train: error: no space left writing {error.filename or 'the run'} ({error.strerror}). "
                       "Every sealed checkpoint is intact: free space, then continue with --resume.\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
