"""The PTB reproduction script and the fidelity command, end to end on a tiny budget: every mode trains from the same
start on uniformly random batches (grouping is opt-in), the per-epoch records, table, JSON and figure are written, a
second run continues instead of restarting (and adds the diag(J) runs), a run with other settings is refused, and the
fidelity diagnostic runs on the kept first-epoch checkpoint."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_then_fidelity(tmp_path):
    output, report = tmp_path / "reproduce", tmp_path / "record"
    command = [sys.executable, str(ROOT / "examples" / "reproduce_ptb.py"), "--hidden", "16", "--epochs", "2",
               "--max-train-samples", "256", "--set", "data.max_eval_samples=128", "--set", "training.logging_steps=1",
               "--output", str(output), "--record", str(report)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((report / "results.json").read_text())
    assert [run["mode"] for run in results["runs"]] == ["bptt", "dsf", "ft_bptt"]
    first_losses = []
    for run in results["runs"]:
        assert run["epochs"] == [1, 2] and all(p > 1 for p in run["validation_perplexity"])
        assert run["seconds_per_epoch"] > 0
        log = [json.loads(line) for line in (output / run["mode"] / "log_history.jsonl").read_text().splitlines()]
        first_losses.append(next(entry["loss"] for entry in log if "loss" in entry))
        assert (output / run["mode"] / "epoch-1" / "model.safetensors").exists()
        assert run["sampling"] == "random"
        record = json.loads((report / f"{run['mode']}.json").read_text())
        assert record["sampling"] == "random" and [epoch["epoch"] for epoch in record["epochs"]] == [1, 2]
        assert [epoch["validation_perplexity"] for epoch in record["epochs"]] == run["validation_perplexity"]
        # The paper's batches: the Trainer's uniformly random sampler, no length grouping asked for.
        started = (output / run["mode"] / "experiment.yaml").read_text()
        assert "train_sampling_strategy" not in started
    # Same seed, initial weights and first batch: the first step's loss (a forward) is the same in every mode.
    assert max(first_losses) - min(first_losses) < 1e-4 * first_losses[0]
    assert (report / "perplexity.png").stat().st_size > 1000
    assert "| dsf |" in (report / "results.md").read_text()
    # The run folders lost (a change of machine): a report from the records alone keeps every number, the test
    # perplexity of each finished mode included.
    assert all(run["test_perplexity_of_best"] > 1 for run in results["runs"])
    alone = subprocess.run(command[:-4] + ["--output", str(tmp_path / "gone"), "--record", str(report),
                                           "--report-only"], capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads((report / "results.json").read_text())["runs"] == results["runs"]

    # Again with the two diag(J) runs added: the finished modes are read back, the new ones train with their settings.
    modes = ["bptt", "dsf", "ft_bptt", "dsf_calibrated", "diag_jacobian"]
    again = subprocess.run(command + ["--modes", *modes], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 3
    extended = json.loads((report / "results.json").read_text())["runs"]
    assert [run["mode"] for run in extended] == modes and extended[:3] == results["runs"]
    calibrated = json.loads((output / "dsf_calibrated" / "config.json").read_text())
    assert calibrated["gradient_mode"] == "dsf_calibrated" and "feedback_type" not in calibrated
    assert json.loads((output / "diag_jacobian" / "config.json").read_text())["gradient_mode"] == "diag_jacobian"
    assert "| diag_jacobian |" in (report / "results.md").read_text()

    # Other batches than the runs started with: refused by name, before anything is trained or rewritten.
    table = (report / "results.json").read_text()
    other = subprocess.run(command + ["--sampling", "group_by_length"], capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "training.train_sampling_strategy" in other.stderr
    assert "[bptt]" in other.stderr and (report / "results.json").read_text() == table

    fidelity_json = report / "fidelity" / "dsf_epoch1.json"
    fidelity_json.parent.mkdir()
    fidelity = subprocess.run([sys.executable, "-m", "sfrnn_hf.training.fidelity", str(output / "dsf" / "epoch-1"),
                               "--batches", "2", "--batch-size", "8", "--max-distance", "4",
                               "--out", str(fidelity_json), "--plot", str(tmp_path / "f.png")],
                              capture_output=True, text=True, timeout=600)
    assert fidelity.returncode == 0, fidelity.stderr[-3000:]
    measured = json.loads(fidelity_json.read_text())
    weight_hh = "model.layers.0.recurrent.weight_hh"
    for mode in ("dsf", "ft_bptt", "dsf_calibrated", "diag_jacobian"):  # the command's default comparisons
        assert -1 <= measured["parameters"][mode][weight_hh]["cosine"] <= 1
    assert measured["state_gradients"]["layers.0"]["distance"] == [0, 1, 2, 3, 4]
    assert (tmp_path / "f.png").exists()

    # The report puts the fidelity JSON into the results document's fidelity table, and publishes every finished
    # mode's best model with the perplexities measured on it.
    doc = tmp_path / "results.md"
    doc.write_text("intro\n<!-- reproduce_ptb: per-epoch tables, written by --report-only --results-doc -->\nold\n"
                   "<!-- reproduce_ptb: end -->\nmiddle\n"
                   "<!-- reproduce_ptb: fidelity table, written by --report-only --results-doc -->\nold\n"
                   "<!-- reproduce_ptb: fidelity end -->\nend\n")
    published = subprocess.run(command + ["--modes", *modes, "--report-only", "--results-doc", str(doc),
                                          "--export-to", str(tmp_path / "hub"), "--cards", str(tmp_path / "cards")],
                               capture_output=True, text=True, timeout=900)
    assert published.returncode == 0, published.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| dsf | 1 |")]
    dsf, ft = measured["parameters"]["dsf"], measured["parameters"]["ft_bptt"]
    expected_dsf = (f"{dsf['model.layers.0.recurrent.weight_ih']['cosine']:.3f} / {dsf[weight_hh]['cosine']:.3f} "
                    f"({measured['layers']['dsf']['layers.0']['norm_ratio']:.2f})")
    expected_ft = (f"{ft['model.layers.0.recurrent.weight_ih']['cosine']:.3f} / {ft[weight_hh]['cosine']:.3f} "
                   f"({measured['layers']['ft_bptt']['layers.0']['norm_ratio']:.2f})")
    assert rows == [f"| dsf | 1 | {expected_ft} | {expected_dsf} | " + " | ".join(
        f"{measured['parameters'][g]['model.layers.0.recurrent.weight_ih']['cosine']:.3f} / "
        f"{measured['parameters'][g][weight_hh]['cosine']:.3f} ({measured['layers'][g]['layers.0']['norm_ratio']:.2f})"
        for g in ("dsf_calibrated", "diag_jacobian"))
        + f" | {measured['feedback_match']['layers.0']['correlation']:.2f} |"]
    # Publishing with flags that describe another run is refused by name, before anything is written.
    table = (report / "results.json").read_text()
    other = subprocess.run(command + ["--hidden", "24", "--modes", "dsf", "--report-only", "--export-to",
                                      str(tmp_path / "hub2")], capture_output=True, text=True, timeout=600)
    assert other.returncode != 0 and "model.hidden_size: 16 -> 24" in other.stderr
    assert not (tmp_path / "hub2").exists() and (report / "results.json").read_text() == table
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    for mode in modes:
        name = f"sfrnn-gru-1x16-ptb-{mode}"
        card = ModelCard.load(tmp_path / "hub" / name / "README.md")
        results = json.loads((output / mode / "results.json").read_text())
        assert {r.dataset_split: r.metric_value for r in card.data.eval_results} == {
            "validation": results["validation_perplexity"], "test": results["test_perplexity"]}
        record = json.loads((report / f"{mode}.json").read_text())
        assert f"the best validation epoch, {record['best_epoch']} of 2" in card.text
        assert "drawn uniformly at random" in card.text
        vocabulary = len(AutoTokenizer.from_pretrained(output / mode / "tokenizer"))
        assert f"Penn Treebank, word level ({vocabulary:,} tokens, the special ones included)" in card.text
        assert (f"`python examples/reproduce_ptb.py --config ptb_gru_1x256 --epochs 2 --modes {mode} --seed 0 --hidden 16 "
                "--max-train-samples 256 --set data.max_eval_samples=128 --set training.logging_steps=1`") in card.text
        assert (tmp_path / "cards" / f"{name}.md").read_text() == (tmp_path / "hub" / name / "README.md").read_text()
        exported, best = (load_file(folder / "model.safetensors") for folder in (tmp_path / "hub" / name, output / mode))
        assert exported.keys() == best.keys() and all(exported[k].equal(best[k]) for k in best)


def test_per_epoch_record_survives_a_kill_and_the_resume_ends_like_an_uninterrupted_run(tmp_path):
    import os
    import signal
    import time

    common = [sys.executable, str(ROOT / "examples" / "reproduce_ptb.py"), "--hidden", "16", "--epochs", "3",
              "--max-train-samples", "512", "--set", "data.max_eval_samples=64", "--modes", "dsf", "--save-steps", "1"]
    whole = subprocess.run(common + ["--output", str(tmp_path / "whole"), "--record", str(tmp_path / "whole_record")],
                           capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    want = json.loads((tmp_path / "whole_record" / "dsf.json").read_text())["epochs"]

    command = common + ["--output", str(tmp_path / "cut"), "--record", str(tmp_path / "record")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = tmp_path / "record" / "dsf.json"
    deadline = time.time() + 600
    while not (record.exists() and json.loads(record.read_text())["epochs"]) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGKILL)  # in epoch 2: epoch 1 is recorded, the run is not finished
    first.wait()
    kept = json.loads(record.read_text())["epochs"]
    assert [epoch["epoch"] for epoch in kept] == [1] and not json.loads(record.read_text())["finished"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads(record.read_text())
    assert final["finished"] and final["sampling"] == "random"
    assert [epoch["epoch"] for epoch in final["epochs"]] == [1, 2, 3]
    assert final["epochs"][0] == kept[0]  # the recorded epoch is kept as it was
    for got, expected in zip(final["epochs"], want):  # the resumed run made the uninterrupted run's updates
        assert got["validation_perplexity"] == expected["validation_perplexity"]


def test_an_epoch_is_recorded_once_its_checkpoint_is_written_even_across_a_stop(tmp_path):
    """The callback sequence of one epoch's end (evaluate, checkpoint with the callback's state, on_save) cut after
    the checkpoint: the record is not in `epochs.jsonl` yet, travels in the checkpoint's callback state, and the
    resumed process appends it exactly once; cut before the checkpoint, nothing is recorded (the resume redoes it)."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("reproduce_ptb", ROOT / "examples" / "reproduce_ptb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = SimpleNamespace(is_world_process_zero=True, epoch=1.0, global_step=7)
    recorder = module.EpochRecorder(str(tmp_path))
    recorder.on_epoch_begin(None, state, None)
    recorder.on_epoch_end(None, state, None)
    recorder.on_evaluate(None, state, None, metrics={"eval_perplexity": 123.0})
    assert module.epoch_records(tmp_path) == []  # evaluated, not yet in a checkpoint
    checkpoint = recorder.state()  # what `_save_checkpoint` stores; the process stops before on_save

    resumed = module.EpochRecorder(**checkpoint["args"])  # how the Trainer restores a callback
    for name, value in checkpoint["attributes"].items():
        setattr(resumed, name, value)
    resumed.on_epoch_begin(None, SimpleNamespace(is_world_process_zero=True, epoch=1.0), None)
    resumed.on_save(None, state, None)
    records = module.epoch_records(tmp_path)
    assert [(r["epoch"], r["step"], r["validation_perplexity"]) for r in records] == [(1, 7, 123.0)]
    assert len((tmp_path / "epochs.jsonl").read_text().splitlines()) == 1

    fresh = module.EpochRecorder(str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    fresh.on_epoch_begin(None, state, None)
    fresh.on_epoch_end(None, state, None)
    fresh.on_evaluate(None, state, None, metrics={"eval_perplexity": 1.0})
    assert not (tmp_path / "other" / "epochs.jsonl").exists()  # stopped before the checkpoint: a resume redoes it


def _reproduce_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_ptb", ROOT / "examples" / "reproduce_ptb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gap_closed_cost_and_targets_of_a_study_with_a_schedule():
    """Four runs of 3 epochs (100 steps each), bits per character: the gap closed, the cost of each epoch at its own
    mode's step time (the scheduled run pays DSF's, then BPTT's), and who reaches each target first."""
    module = _reproduce_module()
    seconds = {"bptt": 2.0, "dsf": 1.5, "ft_bptt": 1.4}
    quality = {"bptt": [2.0, 1.6, 1.40], "dsf": [1.9, 1.65, 1.50], "ft_bptt": [1.95, 1.7, 1.60],
               "dsf_then_bptt": [1.9, 1.65, 1.42]}
    modes = {"dsf_then_bptt": ["dsf", "dsf", "bptt"]}
    rows = [{"mode": mode, "epochs": [1, 2, 3], "steps": [100, 200, 300],
             "gradient_modes": modes.get(mode, [mode] * 3), "validation_quality": values,
             "best_validation_quality": min(values), "test_quality_of_best": min(values) + 0.01}
            for mode, values in quality.items()]
    closed, measure = module.with_gap_closed(rows)
    assert measure == "test_quality_of_best"
    expected = {"bptt": 1.0, "ft_bptt": 0.0, "dsf": (1.61 - 1.51) / (1.61 - 1.41), "dsf_then_bptt": (1.61 - 1.43) / 0.2}
    assert {row["mode"]: round(row["gap_closed"], 12) for row in closed} == \
        {mode: round(value, 12) for mode, value in expected.items()}
    scheduled = next(row for row in rows if row["mode"] == "dsf_then_bptt")
    assert module.cumulative_cost(scheduled, seconds) == [150.0, 300.0, 500.0]
    table = module.targets_table(rows, seconds, "bits per character").splitlines()
    # FT-BPTT's best (1.60): bptt at epoch 2 (400 s), ft_bptt at 3 (420 s), dsf at 3 (450 s), the schedule at 3 (500 s).
    ft_row = next(line for line in table if line.startswith("| ft_bptt's best"))
    assert ft_row.endswith("| bptt, 1.05x cheaper than ft_bptt |")
    # DSF's best (1.50): dsf at epoch 3 (450 s), the schedule at 3 (500 s), bptt at 3 (600 s).
    dsf_row = next(line for line in table if line.startswith("| dsf's best"))
    assert dsf_row.endswith("| dsf, 1.11x cheaper than dsf_then_bptt |") and dsf_row.count("not reached") == 1
    # BPTT's best (1.40): only bptt reaches it (600 s).
    bptt_row = next(line for line in table if line.startswith("| bptt's best"))
    assert bptt_row.count("not reached") == 3 and bptt_row.endswith("| bptt |")
