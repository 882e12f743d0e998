"""A training run never ends silently wrong and never loses work: it owns its output folder, resumes from the newest
intact checkpoint, stops on divergence, names bad data files before training, and writes no secret."""

import errno
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sfrnn_hf.training import train as train_module
from sfrnn_hf.training.checkpoints import MANIFEST, write_manifest
from sfrnn_hf.training.data import DataError
from sfrnn_hf.training.run_folder import LOCK_FILE, OutputDirError
from sfrnn_hf.training.train import TrainingDiverged, main, run
from sfrnn_hf.training.config import ConfigError
from training_helpers import tiny_experiment, write_corpus

SAVE_EVERY_2 = ["training.save_strategy=steps", "training.save_steps=2"]


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _keep_trainer(monkeypatch) -> dict:
    """`{"trainer": ...}`: the `SfrnnTrainer` of the latest `run`, even one that ends in an error."""
    captured = {}
    original_train = train_module.SfrnnTrainer.train

    def keep_trainer(self, *args, **kwargs):
        captured["trainer"] = self
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(train_module.SfrnnTrainer, "train", keep_trainer)
    return captured


# --- the run owns its folder ------------------------------------------------------------------------------------------


def test_a_new_run_into_an_earlier_runs_folder_is_refused_then_starts_clean_with_overwrite(tmp_path):
    run(tiny_experiment(tmp_path, "data.tokenizer=word"))
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        run(tiny_experiment(tmp_path, "data.tokenizer=char"))
    _, _ = run(tiny_experiment(tmp_path, "data.tokenizer=char", "training.overwrite_output_dir=true"))
    out = tmp_path / "run"
    started = yaml.safe_load((out / "experiment.yaml").read_text())
    assert started["data"]["tokenizer"] == "char"
    # The char vocabulary of this corpus, built anew: not the word tokenizer of the earlier run.
    tokenizer = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    letters = set("".join((tmp_path / "train.txt").read_text().split()))
    assert letters <= set(tokenizer["model"]["vocab"]) and "the" not in tokenizer["model"]["vocab"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tokenizer["model"]["vocab"])


def test_a_failed_start_writes_nothing_so_the_retry_builds_its_own_tokenizer(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8\n")
    with pytest.raises(DataError):
        run(tiny_experiment(tmp_path, f"data.validation_files=[{bad}]", "training.max_steps=1"))
    assert not (tmp_path / "run" / "experiment.yaml").exists() and not (tmp_path / "run" / "tokenizer").exists()
    trainer, _ = run(tiny_experiment(tmp_path, "training.max_steps=1"))
    words = set((tmp_path / "train.txt").read_text().split())
    assert len(trainer.processing_class) == len(words) + 4  # the corpus's words and <unk> <pad> <bos> <eos>


def test_a_second_run_into_a_locked_folder_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir(parents=True)
    with open(out / LOCK_FILE, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242")
        holder.flush()
        with pytest.raises(OutputDirError, match="in use by another training run \\(process 4242\\)"):
            run(tiny_experiment(tmp_path, "training.max_steps=1"))
    assert not (out / "experiment.yaml").exists()
    # A process that took the lock and was killed: the kernel dropped its lock.
    script = (f"import fcntl, os, signal; h = open({str(out / LOCK_FILE)!r}, 'a+'); "
              "fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    run(tiny_experiment(tmp_path, "training.max_steps=1"))


def test_output_dir_that_is_a_file_fails_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("data was prepared before the output folder was checked")

    monkeypatch.setattr(train_module, "prepare_data", no_data)
    monkeypatch.setattr(train_module, "load_raw_text", no_data)
    target = tmp_path / "taken"
    target.write_text("a file")
    train = write_corpus(tmp_path / "train.txt", 8, seed=1)
    with pytest.raises(SystemExit) as stop:
        main(["--set", "data.dataset=text", "--set", f"data.train_files=[{train}]", "--set", "data.tokenizer=word",
              "--output-dir", str(target)])
    assert stop.value.code == 2
    assert f"{str(target)!r} is a file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_that_is_not_writable_fails_before_any_data_is_read(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="not writable"):
        run(tiny_experiment(tmp_path, f"training.output_dir={locked / 'run'}"))


def test_a_failed_start_does_not_rewrite_the_settings_a_resume_compares_with(tmp_path, caplog):
    run(tiny_experiment(tmp_path, "training.max_steps=4", *SAVE_EVERY_2))
    out = tmp_path / "run"
    started = (out / "experiment.yaml").read_text()
    bad = tmp_path / "empty.txt"
    bad.write_text("")
    with pytest.raises(DataError):
        run(tiny_experiment(tmp_path, "training.max_steps=6", f"data.validation_files=[{bad}]", *SAVE_EVERY_2,
                            "training.resume_from_checkpoint=true"))
    assert (out / "experiment.yaml").read_text() == started
    # Each checkpoint carries the settings it was trained with; a resume compares against those.
    assert yaml.safe_load((out / "checkpoint-4" / "experiment.yaml").read_text())["training"]["max_steps"] == 4
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        run(tiny_experiment(tmp_path, "training.max_steps=6", *SAVE_EVERY_2, "training.resume_from_checkpoint=true"))
    assert any("training.max_steps: 4 -> 6" in record.getMessage() for record in caplog.records)


def _user_files(folder):
    """A user's own files in a run folder: notes, code in a sub-folder, a copy of the training data."""
    (folder / "notes.txt").write_text("my notes")
    (folder / "src").mkdir(exist_ok=True)
    (folder / "src" / "code.py").write_text("print('mine')")
    shutil.copy(folder.parent / "train.txt", folder / "data.txt")
    return {path: path.read_bytes() for path in (folder / "notes.txt", folder / "src" / "code.py", folder / "data.txt")}


def test_overwrite_and_a_restarting_resume_delete_no_file_that_is_not_the_runs(tmp_path):
    run(tiny_experiment(tmp_path))
    out = tmp_path / "run"
    mine = _user_files(out)
    final = _weights(out)
    with pytest.raises(OutputDirError, match="notes.txt"):
        run(tiny_experiment(tmp_path, "training.overwrite_output_dir=true"))
    (out / "results.json").unlink()  # a run killed before its first checkpoint: a resume would start it over
    with pytest.raises(OutputDirError, match="notes.txt"):
        run(tiny_experiment(tmp_path, "training.resume_from_checkpoint=true"))
    assert all(path.read_bytes() == content for path, content in mine.items())
    _assert_same_weights(_weights(out), final)
    shutil.rmtree(out / "src")  # the user's files moved out: the run's own files go, nothing else was there
    (out / "notes.txt").unlink()
    (out / "data.txt").unlink()
    run(tiny_experiment(tmp_path, "training.overwrite_output_dir=true"))


def test_resuming_a_finished_run_without_checkpoints_keeps_it_and_every_file(tmp_path):
    run(tiny_experiment(tmp_path))  # save_strategy=no: the final model and results.json, no checkpoint
    out = tmp_path / "run"
    mine = _user_files(out)
    final, results = _weights(out), json.loads((out / "results.json").read_text())
    _, resumed = run(tiny_experiment(tmp_path, "training.resume_from_checkpoint=true"))
    assert resumed == results
    with pytest.raises(ConfigError, match="finished.*training.learning_rate: 0.01 -> 0.05"):
        run(tiny_experiment(tmp_path, "training.learning_rate=0.05", "training.resume_from_checkpoint=true"))
    assert all(path.read_bytes() == content for path, content in mine.items())
    _assert_same_weights(_weights(out), final)
    assert yaml.safe_load((out / "experiment.yaml").read_text())["training"]["learning_rate"] == 0.01


def test_a_checkpoint_is_not_resumed_into_the_folder_of_another_run(tmp_path):
    run(tiny_experiment(tmp_path / "lstm", "model.cell_type=lstm", *SAVE_EVERY_2))
    other = tmp_path / "gru"
    run(tiny_experiment(other))
    final = _weights(other / "run")
    with pytest.raises(ConfigError, match="holds another run"):
        run(tiny_experiment(other, "model.cell_type=lstm",
                            f"training.resume_from_checkpoint={tmp_path / 'lstm' / 'run' / 'checkpoint-2'}"))
    _assert_same_weights(_weights(other / "run"), final)
    assert not list((other / "run").glob("checkpoint-*"))


def test_lora_refuses_its_own_base_model_folder_as_output(tmp_path):
    run(tiny_experiment(tmp_path))
    base = tmp_path / "run"
    final = _weights(base)
    for output in (base, base / "lora"):
        with pytest.raises(SystemExit) as stop:
            main(["--lora", str(base), "--output-dir", str(output), "--overwrite", "--set", "data.dataset=text",
                  "--set", f"data.train_files=[{tmp_path / 'train.txt'}]", "--set", "data.tokenizer=word"])
        assert stop.value.code == 2
    _assert_same_weights(_weights(base), final)
    assert AutoModelForCausalLM.from_pretrained(base) is not None


# --- resume -----------------------------------------------------------------------------------------------------------


def test_resuming_a_finished_run_trains_nothing(tmp_path):
    run(tiny_experiment(tmp_path, "training.max_steps=6", *SAVE_EVERY_2))
    out = tmp_path / "run"
    final = _weights(out)
    _, results = run(tiny_experiment(tmp_path, "training.max_steps=6", *SAVE_EVERY_2,
                                     "training.resume_from_checkpoint=true"))
    assert results["global_step"] == 6 and not (out / "checkpoint-7").exists()
    _assert_same_weights(_weights(out), final)
    # Killed during the final save (the last checkpoint written, no results yet): finishes without another step.
    (out / "results.json").unlink()
    (out / "model.safetensors").unlink()
    trainer, results = run(tiny_experiment(tmp_path, "training.max_steps=6", *SAVE_EVERY_2,
                                           "training.resume_from_checkpoint=true"))
    assert results["global_step"] == 6 and trainer.state.global_step == 6 and not (out / "checkpoint-7").exists()
    _assert_same_weights(_weights(out), final)
    assert json.loads((out / "results.json").read_text())["global_step"] == 6


def test_a_finished_run_resumed_with_evaluate_test_reports_its_test_perplexity(tmp_path):
    common = ["training.max_steps=4", *SAVE_EVERY_2, f"data.test_files=[{write_corpus(tmp_path / 'test.txt', 8, 3)}]"]
    _, want = run(tiny_experiment(tmp_path / "with_test", *common, "training.evaluate_test=true", validation=True))
    run(tiny_experiment(tmp_path, *common, validation=True))  # evaluate_test=false
    final = _weights(tmp_path / "run")
    _, results = run(tiny_experiment(tmp_path, *common, "training.evaluate_test=true",
                                     "training.resume_from_checkpoint=true", validation=True))
    assert results["test_perplexity"] == want["test_perplexity"] is not None
    assert results["global_step"] == 4 and results["train_loss"] == want["train_loss"]
    _assert_same_weights(_weights(tmp_path / "run"), final)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test_perplexity"] == want["test_perplexity"]


def _damage_empty(folder):
    shutil.rmtree(folder)
    os.mkdir(folder)


def _damage_partial(folder):
    os.remove(os.path.join(folder, "optimizer.pt"))
    os.remove(os.path.join(folder, MANIFEST))  # killed before the seal


def _damage_truncated(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _damage_flipped(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) - 40)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("damage, reason", [(_damage_empty, "manifest"), (_damage_partial, "manifest"),
                                            (_damage_truncated, "bytes"), (_damage_flipped, "checksum")])
def test_resume_skips_a_damaged_newest_checkpoint_naming_it(tmp_path, caplog, damage, reason):
    common = ["training.max_steps=6", *SAVE_EVERY_2, "training.save_total_limit=3"]
    run(tiny_experiment(tmp_path / "full", *common))
    want = _weights(tmp_path / "full" / "run")
    run(tiny_experiment(tmp_path / "cut", "training.max_steps=6", *SAVE_EVERY_2, "training.save_total_limit=3"))
    out = tmp_path / "cut" / "run"
    (out / "results.json").unlink()  # as if killed while writing checkpoint-6
    damage(str(out / "checkpoint-6"))
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        _, results = run(tiny_experiment(tmp_path / "cut", *common, "training.resume_from_checkpoint=true"))
    skipped = [record.getMessage() for record in caplog.records if "Skipping the damaged checkpoint" in record.getMessage()]
    assert len(skipped) == 1 and "checkpoint-6" in skipped[0] and reason in skipped[0]
    assert "Resuming from" in skipped[0] and "checkpoint-4" in skipped[0]
    assert results["global_step"] == 6
    _assert_same_weights(_weights(out), want)


def test_rotation_waits_for_the_seal_and_resume_keeps_the_checkpoint_it_skips(tmp_path, monkeypatch, caplog):
    common = ["training.max_steps=6", *SAVE_EVERY_2, "training.save_total_limit=1"]
    run(tiny_experiment(tmp_path / "full", *common))
    want = _weights(tmp_path / "full" / "run")
    seals = []

    def killed_before_the_second_seal(folder):
        seals.append(folder)
        if len(seals) == 2:
            raise KeyboardInterrupt  # checkpoint-4 fully written, not sealed
        return write_manifest(folder)

    monkeypatch.setattr(train_module, "write_manifest", killed_before_the_second_seal)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_experiment(tmp_path / "cut", *common))
    monkeypatch.undo()
    out = tmp_path / "cut" / "run"
    assert (out / "checkpoint-2" / MANIFEST).is_file()  # the sealed one was not rotated away
    steps = []
    original_step = train_module.SfrnnTrainer.training_step
    monkeypatch.setattr(train_module.SfrnnTrainer, "training_step",
                        lambda self, *args, **kwargs: steps.append(1) or original_step(self, *args, **kwargs))
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        _, results = run(tiny_experiment(tmp_path / "cut", *common, "training.resume_from_checkpoint=true"))
    skipped = [r.getMessage() for r in caplog.records if "Skipping the damaged checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-4" in skipped[0] and "Resuming from" in skipped[0]
    assert (out / "skipped-checkpoint-4" / "model.safetensors").is_file()  # named and left, never deleted
    assert results["global_step"] == 6 and len(steps) == 4  # continued from step 2
    _assert_same_weights(_weights(out), want)


def test_a_resume_applies_changed_optimizer_settings_at_the_schedules_position(tmp_path, monkeypatch):
    common = ["training.max_steps=4", *SAVE_EVERY_2, "training.scheduler=step", "training.step_every=0.5",
              "training.step_gamma=0.1"]
    resumed = _keep_trainer(monkeypatch)
    learning_rates = {}
    for lr in (0.01, 0.05):  # killed after checkpoint-2, resumed with the same or a changed optimizer
        folder = tmp_path / str(lr)
        run(tiny_experiment(folder, *common))
        shutil.rmtree(folder / "run" / "checkpoint-4")
        (folder / "run" / "results.json").unlink()
        run(tiny_experiment(folder, *common, f"training.learning_rate={lr}", "training.weight_decay=0.1",
                            "training.adam_beta1=0.8", "training.resume_from_checkpoint=true"))
        learning_rates[lr] = {entry["step"]: entry["learning_rate"] for entry in resumed["trainer"].state.log_history
                              if "learning_rate" in entry}
    # StepLR decayed by 0.1 after step 2: the resumed steps run at 0.1 x the new rate.
    assert learning_rates[0.01][3] == pytest.approx(1e-3) and learning_rates[0.05][3] == pytest.approx(5e-3)
    group = resumed["trainer"].optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.999)
    differing = [name for name, tensor in _weights(tmp_path / "0.01" / "run").items()
                         if not torch.equal(tensor, _weights(tmp_path / "0.05" / "run")[name])]
    assert differing  # the changed rate changed the updates


def _killed_after_checkpoint_2(tmp_path, *overrides):
    """A 4-step run checkpointed every 2 steps, as if killed while writing checkpoint-4."""
    run(tiny_experiment(tmp_path, "training.max_steps=4", *SAVE_EVERY_2, *overrides))
    out = tmp_path / "run"
    shutil.rmtree(out / "checkpoint-4")
    (out / "results.json").unlink()
    return out


def test_a_resume_names_a_data_file_whose_content_changed_even_with_the_same_size_and_mtime(
        tmp_path, monkeypatch, caplog):
    _killed_after_checkpoint_2(tmp_path)
    experiment = tiny_experiment(tmp_path, "training.max_steps=4", *SAVE_EVERY_2, "training.resume_from_checkpoint=true")
    train = tmp_path / "train.txt"
    stat, text = train.stat(), train.read_text()
    train.write_text(text.replace("cat", "dog"))  # same size
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime
    trainer = _keep_trainer(monkeypatch)
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        run(experiment)
    changed = [r.getMessage() for r in caplog.records if "other data than it was trained on" in r.getMessage()]
    assert len(changed) == 1 and str(train) in changed[0] and "content changed" in changed[0]
    tokenizer = trainer["trainer"].processing_class
    seen = " ".join(tokenizer.decode(row["input_ids"]) for row in trainer["trainer"].train_dataset)
    assert " cat " not in f" {seen} " and " dog " in f" {seen} "  # the new text, not the `datasets` cache's old one


def test_a_checkpoint_resumed_outside_its_run_keeps_its_own_tokenizer(tmp_path, monkeypatch):
    out = _killed_after_checkpoint_2(tmp_path)
    moved = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", moved)
    vocabulary = json.loads((moved / "tokenizer.json").read_text())["model"]["vocab"]
    experiment = tiny_experiment(tmp_path, "training.max_steps=4", *SAVE_EVERY_2,
                                 f"training.output_dir={tmp_path / 'new'}", f"training.resume_from_checkpoint={moved}")
    train = tmp_path / "train.txt"
    train.write_text("zebra " + train.read_text())  # a rebuilt word tokenizer would shift every id
    trainer = _keep_trainer(monkeypatch)
    run(experiment)
    assert trainer["trainer"].processing_class.get_vocab() == vocabulary


def test_a_checkpoint_without_optimizer_state_is_not_resumed_silently(tmp_path):
    _killed_after_checkpoint_2(tmp_path, "training.save_only_model=true")
    with pytest.raises(ConfigError, match="checkpoint-2: it holds no optimizer.pt"):
        run(tiny_experiment(tmp_path, "training.max_steps=4", *SAVE_EVERY_2,
                            "training.save_only_model=true", "training.resume_from_checkpoint=true"))


def test_resume_with_no_intact_checkpoint_at_a_named_path_is_refused(tmp_path):
    run(tiny_experiment(tmp_path, "training.max_steps=2", *SAVE_EVERY_2))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    _damage_truncated(str(checkpoint))
    with pytest.raises(ConfigError, match="checkpoint-2.*model.safetensors has"):
        run(tiny_experiment(tmp_path / "other", f"training.resume_from_checkpoint={checkpoint}"))


# --- divergence -------------------------------------------------------------------------------------------------------


def test_non_finite_learning_rate_is_refused_at_config_time(tmp_path):
    for value in (".inf", ".nan", "-.inf"):
        with pytest.raises(ConfigError, match="training.learning_rate.*finite"):
            tiny_experiment(tmp_path, f"training.learning_rate={value}")


@pytest.mark.parametrize("override, named", [
    ("model.initializer_range=.inf", "initializer_range"), ("model.initializer_range=.nan", "initializer_range"),
    ("model.layer_norm_eps=-1", "layer_norm_eps"), ("model.layer_norm_eps=.inf", "layer_norm_eps"),
    ("training.label_smoothing_factor=.nan", "training.label_smoothing_factor"),
])
def test_a_setting_out_of_range_is_refused_at_config_time_naming_it(tmp_path, override, named):
    with pytest.raises(ConfigError, match=f"{named}.*(positive finite|finite)"):
        tiny_experiment(tmp_path, "model.block_type=prenorm", override)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton backend runs on CUDA")
def test_a_backend_the_device_cannot_run_is_refused_before_the_folder_is_claimed(tmp_path):
    with pytest.raises(ConfigError, match="dsf_backend.*triton.*CUDA only"):
        run(tiny_experiment(tmp_path, "model.dsf_backend=triton", "model.gradient_mode=dsf"))
    assert not (tmp_path / "run" / "experiment.yaml").exists()
    run(tiny_experiment(tmp_path, "model.dsf_backend=auto", "model.gradient_mode=dsf"))  # the retry is not refused


def test_a_diverging_run_stops_with_exit_3_keeping_its_last_good_checkpoint(tmp_path, capsys):
    train = write_corpus(tmp_path / "train.txt", 64, seed=1)
    argv = ["--set", "data.dataset=text", "--set", f"data.train_files=[{train}]", "--set", "data.tokenizer=word",
            "--set", "data.sequences=sentence", "--set", "model.hidden_size=16", "--set", "training.batch_size=8",
            "--set", "training.max_steps=40", "--set", "training.learning_rate=1.0e+30", "--set", "training.eval_strategy=no",
            "--set", "training.report_to=none", "--set", "training.evaluate_test=false",
            "--set", "training.save_strategy=steps", "--set", "training.save_steps=1",
            "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 3
    message = capsys.readouterr().err
    assert "Training diverged at step" in message and "training.learning_rate (now 1e+30)" in message
    assert not (tmp_path / "run" / "results.json").exists()
    kept = sorted((tmp_path / "run").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert kept and f"the last checkpoint, {kept[-1]}, is kept" in message
    assert all(torch.isfinite(tensor).all() for tensor in _weights(kept[-1]).values())


def test_a_nan_evaluation_stops_training_keeping_the_last_checkpoint_whose_weights_and_evaluation_were_finite(
        tmp_path):
    every_step = ["training.eval_strategy=steps", "training.eval_steps=1", "training.save_strategy=steps",
                  "training.save_steps=1"]
    run(tiny_experiment(tmp_path, "training.max_steps=2", *every_step, validation=True))
    with pytest.raises(TrainingDiverged, match="step 3: the evaluation loss is nan.*checkpoint-2, is kept"):
        run(tiny_experiment(tmp_path, "training.max_steps=6", "training.learning_rate=1.0e+30", *every_step,
                            "training.resume_from_checkpoint=true", validation=True))
    out = tmp_path / "run"
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in out.glob("checkpoint-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        own = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry
               and entry["step"] == state["global_step"]]
        assert own and all(map(math.isfinite, own)), checkpoint
        assert all(torch.isfinite(tensor).all() for tensor in _weights(checkpoint).values()), checkpoint


def test_the_perplexity_of_a_huge_finite_loss_is_infinite_not_a_crash():
    from transformers import EvalPrediction

    stats = np.array([[4.0e5, 100.0], [3.0e5, 100.0]])  # mean NLL 3500 nats: exp overflows a float
    metrics = train_module.perplexity_metrics(EvalPrediction(predictions=stats, label_ids=None))
    assert metrics == {"perplexity": math.inf, "tokens": 200.0}
    assert json.loads(train_module._as_json({"validation_perplexity": metrics["perplexity"]})) == {
        "validation_perplexity": None}
    small = train_module.perplexity_metrics(EvalPrediction(predictions=np.array([[20.0, 10.0]]), label_ids=None))
    assert small["perplexity"] == pytest.approx(math.exp(2.0))


def test_nan_inputs_stop_training_before_any_weight_turns_nan(tmp_path, monkeypatch):
    experiment = tiny_experiment(tmp_path, "training.max_steps=4")
    original = torch.nn.Embedding.forward
    calls = []

    def embedding_with_nan(self, input_ids):
        calls.append(1)
        output = original(self, input_ids)
        return output * float("nan") if len(calls) == 3 else output  # the third step sees NaN inputs_embeds

    monkeypatch.setattr(torch.nn.Embedding, "forward", embedding_with_nan)
    captured = _keep_trainer(monkeypatch)
    with pytest.raises(TrainingDiverged, match="step 3: the training loss is not finite"):
        run(experiment)
    assert all(torch.isfinite(p).all() for p in captured["trainer"].model.parameters())


def test_results_json_is_strict_json_even_with_a_non_finite_number():
    text = train_module._as_json({"validation_perplexity": float("inf"), "train_loss": float("nan"), "step": 3})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(text, parse_constant=refuse) == {"validation_perplexity": None, "train_loss": None, "step": 3}


# --- one line naming the cause ----------------------------------------------------------------------------------------


def _main_argv(tmp_path, *settings):
    train = write_corpus(tmp_path / "train.txt", 64, seed=1)
    argv = ["--set", "data.dataset=text", "--set", f"data.train_files=[{train}]", "--set", "data.tokenizer=word",
            "--set", "model.hidden_size=16", "--set", "training.batch_size=8", "--set", "training.max_steps=4",
            "--set", "training.report_to=none", "--set", "training.save_strategy=steps",
            "--set", "training.save_steps=2", "--output-dir", str(tmp_path / "run")]
    for setting in settings:
        argv += ["--set", setting]
    return argv


def _one_line_exit(capsys, argv, code):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == code
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the progress bars: the one line, no traceback
    assert "Traceback" not in err and error.startswith("sfrnn-train: ") and not error.endswith(":"), err[-2000:]
    return error


def test_yaml_errors_are_one_line_naming_the_override_or_the_file(tmp_path, capsys):
    assert "training.learning_rate=[1," in _one_line_exit(capsys, ["--print-config", "--set", "training.learning_rate=[1,"], 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: [1\n")
    assert f"{bad} is not valid YAML (line 3" in _one_line_exit(capsys, [str(bad), "--print-config"], 2)


def test_ctrl_c_and_a_full_disk_end_in_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    original_step = train_module.SfrnnTrainer.training_step
    steps = []

    def interrupted(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(train_module.SfrnnTrainer, "training_step", interrupted)
    assert "interrupted" in _one_line_exit(capsys, _main_argv(tmp_path), 130)
    monkeypatch.undo()

    def disk_full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, MANIFEST))

    monkeypatch.setattr(train_module, "write_manifest", disk_full)
    assert "no space left writing" in _one_line_exit(capsys, _main_argv(tmp_path) + ["--resume"], 2)
    monkeypatch.undo()
    main(_main_argv(tmp_path) + ["--resume"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["global_step"] == 4


def test_a_resume_that_changes_the_architecture_is_refused_naming_the_setting(tmp_path, capsys):
    main(_main_argv(tmp_path))
    out = tmp_path / "run"
    shutil.rmtree(out / "checkpoint-4")
    (out / "results.json").unlink()
    error = _one_line_exit(capsys, _main_argv(tmp_path, "model.hidden_size=32") + ["--resume"], 2)
    assert "another architecture" in error and "model.hidden_size: 16 -> 32" in error


# --- data ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, split, problem", [
    (b"", "train", "holds no text"),
    (b"\n  \n\t\n", "train", "holds no text"),
    (b"the cat \xe9\xff sat\n", "train", "is not UTF-8"),
    (b"", "validation", "holds no text"),
])
def test_bad_data_files_are_named_in_one_line_before_training(tmp_path, capsys, content, split, problem):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    good = write_corpus(tmp_path / "good.txt", 16, seed=1)
    files = {"train": good, "validation": good}
    files[split] = str(bad)
    with pytest.raises(SystemExit) as stop:
        main(["--set", "data.dataset=text", "--set", f"data.train_files=[{files['train']}]", "--set",
              f"data.validation_files=[{files['validation']}]", "--set", "data.tokenizer=word",
              "--output-dir", str(tmp_path / "run")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(bad) in error and problem in error and split in error
    assert not (tmp_path / "run" / "experiment.yaml").exists()


@pytest.mark.parametrize("content", ["\u200b\u200c\n\u200d\n", "<unk> <eos>\n<pad> <bos>\n"])
def test_a_training_file_without_a_learnable_token_is_refused_before_training(tmp_path, content):
    bad = tmp_path / "invisible.txt"
    bad.write_text(content)
    with pytest.raises(DataError, match="no text|no word besides"):
        run(tiny_experiment(tmp_path, f"data.train_files=[{bad}]"))
    assert not (tmp_path / "run" / "experiment.yaml").exists()


def test_a_byte_order_mark_is_not_glued_to_the_first_word(tmp_path):
    experiment = tiny_experiment(tmp_path)
    train = tmp_path / "train.txt"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
    trainer, _ = run(experiment)
    assert not [word for word in trainer.processing_class.get_vocab() if "\ufeff" in word]


def test_characters_streamed_across_lines_keep_the_line_break(tmp_path):
    trainer, _ = run(tiny_experiment(tmp_path, "data.tokenizer=char", "data.sequences=stream"))
    tokenizer = trainer.processing_class
    streamed = "".join(tokenizer.decode(row["input_ids"]) for row in trainer.train_dataset)
    assert "\n" in streamed and "<unk>" not in streamed
    assert streamed.replace("<bos>", "").replace("<eos>", "") in (tmp_path / "train.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on CUDA")
def test_fp16_without_cuda_is_refused_rather_than_silently_ignored(tmp_path):
    with pytest.raises(ConfigError, match="fp16.*needs CUDA"):
        run(tiny_experiment(tmp_path, "training.fp16=true"))


# --- secrets ---------------------------------------------------------------------------------------------------------


def test_no_token_is_written_to_the_run_folder(tmp_path):
    secret = "hf_SECRETvalue0123456789"
    run(tiny_experiment(tmp_path, f"training.hub_token={secret}", "training.max_steps=2",
                        *SAVE_EVERY_2))
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    # The secret is no setting: resuming with it (or without it) changes nothing.
    assert train_module.settings_changed_since_start(
        tiny_experiment(tmp_path, f"training.hub_token={secret}", "training.max_steps=2", *SAVE_EVERY_2),
        tmp_path / "run") == []


def test_a_secret_of_any_type_is_never_printed_nor_written(tmp_path, capsys, caplog):
    digits = "98765432109876543210"  # YAML reads it as an int
    for secret in (digits, "hf_SECRETvalue0123456789"):
        assert main(["--print-config", "--set", f"training.hub_token={secret}"]) == 0
        assert secret not in capsys.readouterr().out
    run(tiny_experiment(tmp_path, "training.max_steps=2", *SAVE_EVERY_2))
    out = tmp_path / "run"
    (out / "results.json").unlink()  # killed in the final save: the resume writes the run's files again
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):  # a resume that adds the token
        run(tiny_experiment(tmp_path, "training.max_steps=2", *SAVE_EVERY_2, f"training.hub_token={digits}",
                            "training.resume_from_checkpoint=true"))
    assert not any(digits in record.getMessage() for record in caplog.records)
    assert digits not in capsys.readouterr().err
    for path in out.rglob("*"):
        if path.is_file():
            assert digits.encode() not in path.read_bytes(), path
    for args_file in out.rglob("training_args.bin"):
        assert torch.load(args_file, weights_only=False).hub_token is None, args_file


def test_redaction_names_secrets_not_tokenizers():
    from sfrnn_hf.training.run_folder import REDACTED, redact_secrets

    tree = {"data": {"tokenizer": "char"}, "training": {"trainer_args": {
        "hub_token": "x", "HF_TOKEN": "y", "push_to_hub_token": "z", "include_num_input_tokens_seen": True}}}
    clean = redact_secrets(tree)
    assert clean["data"]["tokenizer"] == "char"
    args = clean["training"]["trainer_args"]
    assert args["hub_token"] == args["HF_TOKEN"] == args["push_to_hub_token"] == REDACTED
    assert args["include_num_input_tokens_seen"] is True
