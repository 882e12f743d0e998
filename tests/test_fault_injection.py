"""Fault injection: a tiny training run killed with SIGKILL at many points (inside steps, between the files of a
checkpoint, before its seal, between the seal and the rotation of older checkpoints, during evaluation, during the final
save, before the results) and resumed, every time, ends with the weights and results of the uninterrupted run, bit for
bit. An export killed anywhere leaves its output folder as the earlier export or the new one, whole."""

import json
import multiprocessing
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from training_helpers import write_corpus

# 10 steps (48 sentences, batch 8: 6 an epoch), evaluated and checkpointed every 2 steps. Counts per event in one
# uninterrupted run: 10 steps; 6 weight files (5 checkpoints + the final best model); 20 state files (optimizer,
# scheduler, RNG, args per checkpoint); 5 seals, each followed by a rotation (the 3rd on deletes one); 5 evaluations +
# 1 final (2 batches each); 6 save_model calls.
KILL_POINTS = ([f"step:{n}" for n in range(1, 11)] + [f"weights:{n}" for n in range(1, 7)]
               + [f"state:{n}" for n in range(1, 21, 3)] + [f"seal:{n}" for n in range(1, 6)]
               + [f"rotate:{n}" for n in (3, 5)] + [f"evaluate:{n}" for n in range(1, 13, 2)]
               + [f"final:{n}" for n in range(1, 7)] + ["results:1"])
# An export: its weights, its card, the swap into place, the deletion of the earlier folder.
EXPORT_KILL_POINTS = ["weights:1", "card:1", "replace:1", "cleanup:2"]


def _config(tmp_path) -> str:
    config = {
        "model": {"hidden_size": 16, "num_hidden_layers": 2, "gradient_mode": "dsf"},
        "data": {"dataset": "text", "tokenizer": "word", "sequences": "sentence", "max_length": 16,
                 "train_files": [write_corpus(tmp_path / "train.txt", 48, seed=1)],
                 "validation_files": [write_corpus(tmp_path / "valid.txt", 16, seed=2)]},
        "training": {"batch_size": 8, "max_steps": 10, "learning_rate": 1.0e-2, "eval_strategy": "steps",
                     "eval_steps": 2, "per_device_eval_batch_size": 8, "evaluate_test": False, "logging_steps": 1,
                     "report_to": "none", "save_total_limit": 2, "disable_tqdm": True, "save_strategy": "steps",
                     "save_steps": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def processes():
    """Fresh processes forked from a server that has imported torch, transformers and the package once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sfrnn_hf.training.train", "fault_driver"])
    return context


def _drive(processes, config, output_dir, kill_at=None):
    import fault_driver

    process = processes.Process(target=fault_driver.drive, args=(config, str(output_dir), kill_at))
    process.start()
    process.join(timeout=300)
    assert process.exitcode in (0, -9), f"{kill_at}: exit code {process.exitcode}"
    return process.exitcode


def _final(output_dir):
    results = json.loads((output_dir / "results.json").read_text())
    return load_file(output_dir / "model.safetensors"), results


def test_killed_anywhere_and_resumed_the_run_ends_bit_identical(tmp_path, processes):
    config = _config(tmp_path)
    assert _drive(processes, config, tmp_path / "whole") == 0
    want_weights, want_results = _final(tmp_path / "whole")
    survived = []
    for point in KILL_POINTS:
        folder = tmp_path / point.replace(":", "-")
        assert _drive(processes, config, folder, kill_at=point) == -9, f"{point} was never reached"
        launches = 1
        while _drive(processes, config, folder) != 0:  # the resume itself is never killed; it may not need a second try
            launches += 1
            assert launches < 4
        weights, results = _final(folder)
        for name, tensor in want_weights.items():
            assert torch.equal(weights[name], tensor), f"{point}: {name}"
        assert results["validation_perplexity"] == want_results["validation_perplexity"], point
        assert results["global_step"] == want_results["global_step"] == 10, point
        survived.append(point)
    assert survived == KILL_POINTS
    print(f"{len(KILL_POINTS)} kill points tried, {len(survived)} survived bit-identical")


def _contents(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_an_export_killed_anywhere_leaves_the_earlier_export_or_the_new_one_whole(tmp_path, processes):
    import fault_driver

    run = tmp_path / "run"
    assert _drive(processes, _config(tmp_path), run) == 0

    def export(checkpoint, output, kill_at=None):
        process = processes.Process(target=fault_driver.export, args=(str(checkpoint), str(output), kill_at))
        process.start()
        process.join(timeout=300)
        return process.exitcode

    assert export(run / "checkpoint-8", tmp_path / "old" / "hub") == 0
    assert export(run, tmp_path / "new" / "hub") == 0
    old, new = _contents(tmp_path / "old" / "hub"), _contents(tmp_path / "new" / "hub")
    assert old != new
    for point in EXPORT_KILL_POINTS:
        output = tmp_path / point.replace(":", "-") / "hub"
        shutil.copytree(tmp_path / "old" / "hub", output)
        assert export(run, output, kill_at=point) == -9, f"{point} was never reached"
        assert _contents(output) in (old, new), point
