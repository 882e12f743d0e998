"""The benchmark plumbing: interleaving order, the paired ratio, and the layer and step scripts end to end (tiny
sizes: these check that the scripts run and report every mode, not how fast anything is)."""

import os
import subprocess
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

from common import Timings, interleaved_timings  # noqa: E402


def test_interleaving_reverses_the_order_every_other_repeat():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = interleaved_timings(steps, torch.device("cpu"), warmup=1, repeats=3)
    # warm-up: each once, in order; then a b c | c b a | a b c
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")
    assert all(len(runs) == 3 for runs in timings.runs.values())


def test_paired_ratio_is_the_median_of_ratios_within_a_repeat():
    # The machine slows down in repeat 2 for both steps: the paired ratio sees 2.0 every time, the medians do not.
    timings = Timings(runs={"a": [2.0, 8.0, 4.0], "b": [1.0, 4.0, 2.0]}, peak={})
    assert timings.paired_ratio("a", "b") == 2.0
    assert timings.median == {"a": 4.0, "b": 2.0}
    assert timings.best == {"a": 2.0, "b": 1.0}
    assert timings.ratios("a", "b") == (2.0, 2.0, 2.0)
    skewed = Timings(runs={"a": [1.0, 9.0, 3.0], "b": [1.0, 1.0, 2.0]}, peak={})
    assert skewed.paired_ratio("a", "b") == 1.5  # ratios 1, 9, 1.5
    assert skewed.ratios("a", "b") == (3.0, 1.0, 1.5)  # medians 3 / 1, best runs 1 / 1, paired


def _run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args], capture_output=True, text=True,
                            env=env, cwd=BENCHMARKS, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_layer_benchmark_reports_every_mode_and_ratio(cell):
    out = _run("layer.py", "--cells", cell, "--lengths", "8", "--hidden", "16", "--layers", "1", "--batch", "2",
               "--repeats", "2", "--lora")
    rows = [line.split() for line in out.splitlines() if line.startswith(cell)]
    assert [row[3] for row in rows] == ["bptt", "dsf", "dsf_calibrated", "ft_bptt", "diag_jacobian", "dsf+lora"]
    for row in rows:  # BPTT/mode three ways (medians, best runs, paired), each a positive ratio
        ratios = [float(cell.rstrip("x")) for cell in row[-3:]]
        assert all(ratio > 0 for ratio in ratios) and all(cell.endswith("x") for cell in row[-3:])
    for label in ("FT-BPTT / DSF", "DSF+LoRA / DSF", "diag_jacobian / DSF", "calibrated / DSF"):
        assert f"{label} time:" in out and "(paired)" in out


def test_dsf_forward_profile_reports_every_piece_of_every_cell():
    out = _run("dsf_forward.py", "--cells", "lstm", "gru", "rnn", "--lengths", "8", "--hidden", "16", "--batch", "2",
               "--warmup", "1", "--repeats", "1")
    for cell in ("lstm", "gru", "rnn"):
        section = out.split(f"{cell} T=8")[1].split(" T=")[0]
        for piece in ("step matmul addmm", "dsf forward addmm", "dsf backward", "torch BPTT total", "BPTT / DSF"):
            assert piece in section, (cell, piece)


def test_train_step_benchmark_reports_every_mode():
    out = _run("train_step.py", "--hidden", "16", "--layers", "1", "--batch", "2", "--length", "8", "--vocab", "32",
               "--repeats", "2")
    for mode in ("bptt", "dsf", "ft_bptt", "diag_jacobian"):
        assert f"BPTT/{mode}:" in out
    assert "paired" in out


def test_padding_benchmark_compares_a_random_ptb_batch_with_the_same_tokens_dense():
    out = _run("padding.py", "--hidden", "8", "--batch", "6", "--modes", "dsf", "bptt", "--warmup", "1",
               "--repeats", "1")
    assert "random PTB batch (6, " in out and "dense (6, " in out
    for mode in ("dsf", "bptt"):
        row = next(line for line in out.splitlines() if line.strip().startswith(mode))
        assert row.count("x, ") == 4  # padded, with full logits, with subnormal rows, packed: each against dense
