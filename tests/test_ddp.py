"""Multi-process data parallelism: the training command under `torchrun` with 2 CPU processes (gloo) ends with
identical weights on both ranks, equal to one process over the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from sfrnn_hf.training.train import run
from sfrnn_hf.training.config import load_config
from training_helpers import write_corpus

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# calibrated: each layer's feedback is the global batch's mean diag(J), summed over both ranks at each optimizer step.
@pytest.mark.parametrize("mode", ["dsf", "dsf_calibrated"])
def test_two_gloo_processes_match_one_process_over_the_same_global_batch(tmp_path, mode):
    train = write_corpus(tmp_path / "train.txt", 32, seed=5)
    config = {
        "model": {"hidden_size": 16, "num_hidden_layers": 2, "gradient_mode": mode, "feedback_momentum": 0.5},
        "data": {"dataset": "text", "tokenizer": "word", "sequences": "sentence", "max_length": 16,
                 "train_files": [train]},
        "training": {"output_dir": str(tmp_path / "ddp"), "batch_size": 8, "max_steps": 3, "learning_rate": 1.0e-2,
                     "eval_strategy": "no", "evaluate_test": False, "logging_steps": 1, "report_to": "none",
                     "disable_tqdm": True, "save_strategy": "no", "train_sampling_strategy": "sequential"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               os.path.join(HERE, "ddp_worker.py"), str(path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["wrapper"] == "DistributedDataParallel" and rank["find_unused_parameters"] is False
        assert (rank["world_size"], rank["per_device_train_batch_size"], rank["backend"]) == (2, 4, "gloo")
    for name, tensor in ranks[0]["state_dict"].items():
        assert torch.equal(tensor, ranks[1]["state_dict"][name]), name  # DDP keeps the replicas bit-identical
    feedback = ranks[0]["state_dict"]["model.layers.0.recurrent.feedback"]
    assert torch.equal(feedback, torch.linspace(0, 1, 16)) == (mode == "dsf")

    # One process, batch 8 (the same 8 sentences per step as the two ranks' 4 + 4).
    single, _ = run(load_config(str(path), [f"training.output_dir={tmp_path / 'single'}"]))
    assert single.args.world_size == 1 and single.args.per_device_train_batch_size == 8
    state = single.model.state_dict()
    # Tolerance: gloo sums the two ranks' gradients in another order than one process does (float32 rounding,
    # ~1e-9 on gradients); Adam's ~lr * sign(g) steps turn that into at most ~1e-6 on weights after 3 steps.
    for name, tensor in ranks[0]["state_dict"].items():
        torch.testing.assert_close(tensor, state[name], rtol=1e-5, atol=2e-6, msg=name)
    logged = [e["loss"] for e in single.state.log_history if "loss" in e]
    assert ranks[0]["losses"] == pytest.approx(logged, rel=1e-5)  # the token-mean loss over both ranks
    assert max((tensor - state[name]).abs().max().item() for name, tensor in ranks[0]["state_dict"].items()) < 2e-6


def test_the_training_command_under_torchrun_leaves_the_process_group_before_exit(tmp_path):
    """`sfrnn-train` itself (its `main`) under torchrun: both ranks train, rank 0 writes the results, and each leaves
    the gloo group (`Trainer.end`) instead of tearing it down at interpreter exit."""
    write_corpus(tmp_path / "train.txt", 32, seed=5)
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, torch\n"
        "from sfrnn_hf.training.train import main\n"
        "assert main(sys.argv[1:]) == 0\n"
        "open(f\"left{os.environ['RANK']}\", 'w').write(str(torch.distributed.is_initialized()))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(probe), "--output-dir", "run"]
    for setting in ("data.dataset=text", "data.tokenizer=word", "data.train_files=[train.txt]", "model.hidden_size=8",
                    "training.batch_size=8", "training.max_steps=2", "training.eval_strategy=no",
                    "training.evaluate_test=false", "training.report_to=none", "training.save_strategy=no"):
        command += ["--set", setting]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert [(tmp_path / f"left{rank}").read_text() for rank in (0, 1)] == ["False", "False"]
    assert (tmp_path / "run" / "results.json").exists()
