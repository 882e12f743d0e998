"""Runs one `sfrnn_hf.training.train.run` of a YAML config, killing its own process with SIGKILL at the N-th call of one
function (fault injection for `test_fault_injection.py`). Resumes when the folder already holds a run.

    python tests/fault_driver.py CONFIG OUTPUT_DIR [--kill-at EVENT:N]

`drive` is the same in a process of a multiprocessing forkserver that has imported this module (no import per run);
`export` runs `sfrnn-export` the same way.
"""

import argparse
import os
import shutil
import signal
import sys

import safetensors.torch
import torch
from huggingface_hub import ModelCard

from sfrnn_hf.training import export as export_module
from sfrnn_hf.training import train
from sfrnn_hf.training.run_folder import earlier_run
from sfrnn_hf.training.config import load_config

# Where a kill can land: the function whose N-th call dies (before it runs, or after `after` of them).
EVENTS = {
    "step": (train.SfrnnTrainer, "training_step"),  # inside an optimizer step (forward not yet run)
    "weights": (safetensors.torch, "save_file"),  # before a model.safetensors (checkpoint or final) is written
    "state": (torch, "save"),  # optimizer / scheduler / RNG / args files of a checkpoint, one at a time
    "seal": (train, "write_manifest"),  # every file of a checkpoint written, the manifest not yet
    "rotate": (train, "rotate_checkpoints"),  # a checkpoint sealed, the older ones not yet rotated away
    "evaluate": (train.SfrnnTrainer, "prediction_step"),  # in the middle of an evaluation
    "final": (train.SfrnnTrainer, "save_model"),  # a checkpoint's model, or the final save of the best model
    "results": (train, "_as_json"),  # training and evaluation done, results.json not yet written
    # sfrnn-export (weights: `save_file` above)
    "card": (ModelCard, "save"),  # weights and tokenizer written, the model card not yet
    "replace": (export_module, "_replace"),  # the new folder complete beside the output, not yet in place
    "cleanup": (shutil, "rmtree"),  # 2nd call: the new folder in place, the earlier one not yet deleted
}


def kill_at(event: str, count: int) -> None:
    owner, name = EVENTS[event]
    original = getattr(owner, name)
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, dying)
    if owner is safetensors.torch:  # transformers imported the function by name
        import transformers.modeling_utils as modeling_utils

        modeling_utils.safe_save_file = dying


def drive(config: str, output_dir: str, kill: str | None = None) -> None:
    """Train (or resume) the run of `config` in `output_dir`, dying at `kill` (`EVENT:N`) if given."""
    torch.set_num_threads(1)
    if kill:
        event, count = kill.split(":")
        kill_at(event, int(count))
    overrides = [f"training.output_dir={output_dir}"]
    if earlier_run(output_dir):
        overrides.append("training.resume_from_checkpoint=true")
    train.run(load_config(config, overrides))


def export(checkpoint: str, output: str, kill: str | None = None) -> None:
    """`sfrnn-export CHECKPOINT OUTPUT --dataset ptb_text_only`, dying at `kill` (`EVENT:N`) if given."""
    torch.set_num_threads(1)
    if kill:
        event, count = kill.split(":")
        kill_at(event, int(count))
    export_module.main([checkpoint, output, "--dataset", "ptb_text_only"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at", help="EVENT:N")
    args = parser.parse_args()
    drive(args.config, args.output_dir, args.kill_at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
