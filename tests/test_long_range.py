"""examples/long_range.py: credit across time, at the smallest setting that shows it in seconds. Delayed recall over 20
steps (a GRU of width 32, 200 Adam steps): exact BPTT and DSF learn the key, FT-BPTT, which gives no credit across
time, stays at chance. A DSF backward that stops carrying credit across time (a zero feedback) fails here. And the
script's plumbing: every mode starts from the same weights on the same batch, a finished setting is skipped, the
table lands in its marked block."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import long_range  # noqa: E402

CHANCE = 1 / long_range.KEYS


@pytest.fixture(scope="module")
def recall_accuracy():
    """Held-out accuracy of each mode on delayed recall, T = 20, from the same seed, weights and batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a width-32 model: a second thread only waits
    try:
        return {mode: long_range.train_setting("recall", "gru", 20, mode, steps=200, seed=0)["value"]
                for mode in ("bptt", "dsf", "ft_bptt")}
    finally:
        torch.set_num_threads(threads)


def test_dsf_carries_credit_across_time(recall_accuracy):
    # Chance is 0.25; 512 held-out sequences put its standard deviation at 0.02.
    assert recall_accuracy["dsf"] > 0.9, recall_accuracy


def test_exact_bptt_solves_the_task_at_this_size(recall_accuracy):
    assert recall_accuracy["bptt"] > 0.9, recall_accuracy


def test_no_credit_across_time_stays_at_chance(recall_accuracy):
    assert recall_accuracy["ft_bptt"] < CHANCE + 0.1, recall_accuracy


@pytest.mark.parametrize("task", long_range.TASKS)
def test_every_mode_starts_from_the_same_weights_and_batch(task):
    first_losses = {mode: long_range.train_setting(task, "gru", 8, mode, steps=1, eval_size=8)["train_loss"][0][1]
                    for mode in long_range.RUNS}
    reference = first_losses["bptt"]
    assert all(abs(loss - reference) <= 1e-6 * reference for loss in first_losses.values()), first_losses


def test_resumes_and_writes_the_table_block(tmp_path):
    output, doc = tmp_path / "records", tmp_path / "results.md"
    start, end = long_range.RESULTS_BLOCK
    doc.write_text(f"# before\n\n{start}\nold table\n{end}\n\n# after\n")
    argv = ["--tasks", "recall", "--cells", "gru", "--lengths", "8", "--modes", "dsf", "--steps", "2",
            "--output", str(output), "--results-doc", str(doc)]
    long_range.main(argv)
    record_file = output / "recall_gru_T8_dsf.json"
    record = json.loads(record_file.read_text())
    assert (record["task"], record["length"], record["mode"], record["steps"]) == ("recall", 8, "dsf", 2)
    assert len(record["carriers"]["share"]) == record["width"]
    written = record_file.stat().st_mtime_ns
    long_range.main(argv)  # the setting's JSON exists: skipped, not retrained
    assert record_file.stat().st_mtime_ns == written
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# before") and text.rstrip().endswith("# after")
    block = text[text.index(start):text.index(end)]
    assert "| gru | dsf | " in block and f"{record['value']:.2f}" in block


def test_a_length_too_short_is_refused():
    with pytest.raises(SystemExit, match="at least 4, got 2"):
        long_range.main(["--lengths", "2", "--report-only"])
