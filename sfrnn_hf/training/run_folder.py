"""A training run owns its `output_dir`: checked writable before any data is prepared, locked for the run's life (the
kernel drops the lock of a killed process), and never mixed with an earlier run's files unless resumed."""

import dataclasses
import fcntl
import fnmatch
import os
import shutil

from ..configuration_sfrnn import fold_feedback_type
from .checkpoints import checkpoints
from .config import DataConfig, LoraSection
from .config_reading import is_secret
from .training_section import TrainingConfig, canonical_training, trainer_default, trainer_fields

LOCK_FILE = ".sfrnn-run.lock"
# What marks a folder as holding a run: its settings, its checkpoints, its results.
RUN_MARKERS = ("experiment.yaml", "results.json")
# Everything a run writes at the top of its folder (the Trainer's final save, the code files `save_pretrained` copies,
# the tokenizer, LoRA's adapter and card, TensorBoard's `runs/`): all that `clear` may delete.
RUN_FILES = (LOCK_FILE, *RUN_MARKERS, "log_history.jsonl", "tokenizer", "merged", "runs", "checkpoint-*",
             "skipped-checkpoint-*", "config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "training_args.bin", "*_sfrnn.py", "lora_targets.py", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
             "adapter_config.json", "adapter_model.safetensors", ".write-test-*", "*.tmp-*")
ADAPTER_CARD = "README.md"  # the card PEFT writes beside an adapter: the run's only when the adapter is there
REDACTED = "<redacted>"
# Settings a resumed run may change without changing its updates: where and how it logs, saves and evaluates.
RESUMABLE_CHANGES = tuple(f"training.{key}" for key in (
    "output_dir", "resume_from_checkpoint", "logging_steps", "report_to", "save_total_limit", "evaluate_test",
    "per_device_eval_batch_size", "dataloader_num_workers", "overwrite_output_dir")) + ("data.num_proc",)


class OutputDirError(ValueError):
    """The output folder cannot be used by this run (not writable, in use, or holding another run)."""


def check_writable(output_dir: str) -> None:
    """Create `output_dir` if needed and prove it writable; raises `OutputDirError` naming the folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"`training.output_dir` {output_dir!r} is a file, not a folder.")
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise OutputDirError(f"`training.output_dir` {output_dir!r} is not writable: {error.strerror}.") from error


class RunLock:
    """Exclusive `flock` on `output_dir/.sfrnn-run.lock` while the run lives; a second run gets `OutputDirError`
    naming the process that holds it. Released on exit, and by the kernel when the process dies."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.handle = None

    def __enter__(self):
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputDirError(f"{os.path.dirname(self.path)!r} is in use by another training run (process "
                                 f"{holder}); wait for it to end or choose another `training.output_dir`.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None
        return False


def earlier_run(output_dir: str) -> list[str]:
    """The files and checkpoints of an earlier run in `output_dir` (empty: none)."""
    found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(output_dir, name))]
    return found + [os.path.basename(path) for path in checkpoints(output_dir)]


def foreign_files(output_dir: str) -> list[str]:
    """The entries at the top of `output_dir` that no run writes (`RUN_FILES`): a user's own, never deleted."""
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    adapter = "adapter_config.json" in names
    return [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)
            and not (adapter and name == ADAPTER_CARD)]


def check_only_run_files(output_dir: str, action: str) -> None:
    """Raise `OutputDirError` naming the first file in `output_dir` that is not a run's own: `action` (which would
    delete the run's files) is refused rather than mixing or losing a user's files."""
    foreign = foreign_files(output_dir)
    if foreign:
        raise OutputDirError(
            f"{output_dir} holds files that are not a training run's ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): {action} would mix them with a new run. Move them out, or "
            "choose another `training.output_dir`.")


def clear(output_dir: str, action: str = "--overwrite") -> None:
    """Delete the files of an earlier run in `output_dir` (`RUN_FILES`), all but the lock: the start of a clean run.
    A folder holding anything else is refused (`check_only_run_files`) before anything is deleted."""
    check_only_run_files(output_dir, action)
    for name in os.listdir(output_dir):
        if name == LOCK_FILE:
            continue
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def redact_secrets(tree):
    """A copy of a nested settings mapping with every value (of any type) under a key naming a token, secret, password
    or API key replaced by `<redacted>`: what may be printed or written to the run folder."""
    if isinstance(tree, dict):
        return {key: REDACTED if is_secret(key) and value not in (None, "") else redact_secrets(value)
                for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_secrets(value) for value in tree]
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
    """`{"training": {"lr_scheduler_kwargs": {"a": 1}}}` -> `{"training.lr_scheduler_kwargs.a": 1}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(started: dict, now: dict) -> list[str]:
    """What a resume would change in the run it continues: `"section.key: <started> -> <now>"` for every setting
    (`ExperimentConfig.to_dict()` form, also an earlier config's names) that differs, except `RESUMABLE_CHANGES`. A
    setting a record lacks (written before the setting existed) counts as its default; a LoRA section disabled in
    both is no setting of the run."""
    before, after = (_flatten({**tree, "model": fold_feedback_type(tree.get("model") or {}),
                               "training": canonical_training(tree.get("training") or {}),
                               "lora": tree.get("lora") if (tree.get("lora") or {}).get("enabled") else {}})
                     for tree in (started, now))
    defaults = _flatten({"data": dataclasses.asdict(DataConfig()), "training": dataclasses.asdict(TrainingConfig()),
                         "lora": dataclasses.asdict(LoraSection())})

    def value(settings, key):
        section, _, name = key.partition(".")
        if key in settings or key in defaults:
            return settings.get(key, defaults.get(key))
        return trainer_default(name) if section == "training" and name in trainer_fields() else "<unset>"

    return [f"{key}: {value(before, key)!r} -> {value(after, key)!r}" for key in sorted(before | after)
            if key not in RESUMABLE_CHANGES and value(before, key) != value(after, key)
            and not is_secret(key)]  # a secret is not a setting (never written, never shown)
