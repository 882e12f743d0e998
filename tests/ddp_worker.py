"""One rank of the 2-process DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py CONFIG [overrides]`.
Trains with `sfrnn_hf.training.train.run` and saves this rank's final weights and what its DDP wrapper was set to."""

import os
import sys

import torch

from sfrnn_hf.training.train import run
from sfrnn_hf.training.config import load_config

if __name__ == "__main__":
    torch.set_num_threads(1)
    experiment = load_config(sys.argv[1], sys.argv[2:])
    trainer, _ = run(experiment)
    wrapped = trainer.model_wrapped
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "wrapper": type(wrapped).__name__,
            "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
            "world_size": trainer.args.world_size,
            "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        },
        os.path.join(experiment.trainer_args["output_dir"], f"rank{os.environ.get('RANK', 'single')}.pt"),
    )
