"""The gradient-mode schedule (`training.gradient_mode_schedule`, `GradientModeSchedule`): a switch after step N is
resuming step N's checkpoint with the other mode; a resume on either side of a switch continues exactly; each
checkpoint and results.json record the modes; bad schedules are refused naming the entry."""

import json

import pytest
import torch
from transformers import TrainerCallback

from sfrnn_hf.training.config import ConfigError
from sfrnn_hf.training.gradient_schedule import GradientModeSchedule, parse_schedule
from sfrnn_hf.training.train import run
from training_helpers import tiny_experiment

# 24 sentences, batch 8: 3 optimizer steps an epoch, 6 steps in all; checkpoints at every step.
COMMON = ["model.gradient_mode=dsf", "training.max_steps=6", "training.save_strategy=steps",
          "training.save_steps=1", "training.save_total_limit=null"]
SWITCH_AT_3 = "training.gradient_mode_schedule=[{after_steps: 3, gradient_mode: bptt}]"


class ModeOfEachStep(TrainerCallback):
    """The model's gradient mode when each optimizer step's gradients are complete."""

    def __init__(self):
        self.modes = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.modes[state.global_step + 1] = model.config.gradient_mode


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=0, msg=name)


def _differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6) for name in a)


def test_a_switch_after_step_n_equals_resuming_step_ns_checkpoint_with_the_other_mode(tmp_path):
    modes = ModeOfEachStep()
    scheduled, results = run(tiny_experiment(tmp_path / "scheduled", *COMMON, SWITCH_AT_3, train_lines=24),
                             callbacks=[modes])
    assert modes.modes == {1: "dsf", 2: "dsf", 3: "dsf", 4: "bptt", 5: "bptt", 6: "bptt"}
    # Reference: a DSF run, and its step-3 checkpoint resumed (elsewhere) with gradient_mode=bptt.
    dsf, _ = run(tiny_experiment(tmp_path / "dsf", *COMMON, train_lines=24))
    checkpoint = tmp_path / "dsf" / "run" / "checkpoint-3"
    resumed, _ = run(tiny_experiment(tmp_path / "resumed", *COMMON, "model.gradient_mode=bptt",
                                     f"training.resume_from_checkpoint={checkpoint}", train_lines=24))
    _assert_same_weights(_weights(resumed), _weights(scheduled))
    assert _differ(_weights(dsf), _weights(scheduled))  # the switch changed the training: BPTT's steps are not DSF's

    # Recorded: each checkpoint's config holds the mode its last step trained with; results.json the schedule.
    folder = tmp_path / "scheduled" / "run"
    for step in range(1, 7):
        config = json.loads((folder / f"checkpoint-{step}" / "config.json").read_text())
        assert config["gradient_mode"] == modes.modes[step]
    assert results["gradient_mode_schedule"] == [{"after_steps": 3, "gradient_mode": "bptt"}]
    assert json.loads((folder / "results.json").read_text())["gradient_mode_schedule"] == results["gradient_mode_schedule"]


@pytest.mark.parametrize("resume_at", [2, 4])  # before and after the switch
def test_resuming_on_either_side_of_the_switch_is_exact(tmp_path, resume_at):
    full, _ = run(tiny_experiment(tmp_path / "full", *COMMON, SWITCH_AT_3, train_lines=24))
    checkpoint = tmp_path / "full" / "run" / f"checkpoint-{resume_at}"
    modes = ModeOfEachStep()
    resumed, _ = run(tiny_experiment(tmp_path / "resumed", *COMMON, SWITCH_AT_3,
                                     f"training.resume_from_checkpoint={checkpoint}", train_lines=24),
                     callbacks=[modes])
    assert modes.modes == {step: "dsf" if step <= 3 else "bptt" for step in range(resume_at + 1, 7)}
    _assert_same_weights(_weights(full), _weights(resumed))


def test_a_switch_after_an_epoch_takes_the_trainers_steps_per_epoch(tmp_path):
    # 20 sentences, batch 8 as 2 x 4: 5 micro-batches an epoch -> 3 optimizer steps (the last one a single micro-batch).
    modes = ModeOfEachStep()
    run(tiny_experiment(tmp_path, "model.gradient_mode=dsf", "training.max_steps=-1", "training.num_train_epochs=3",
                        "training.gradient_accumulation_steps=2",
                        "training.gradient_mode_schedule=[{after_epochs: 2, gradient_mode: ft_bptt}]", train_lines=20),
        callbacks=[modes])
    assert modes.modes == {step: "dsf" if step <= 6 else "ft_bptt" for step in range(1, 10)}


@pytest.mark.parametrize("schedule, named", [
    ("[{after_steps: 3, gradient_mode: dfs}]", "'dfs'"),
    ("[{after_steps: 0, gradient_mode: bptt}]", "after_steps must be a positive integer, got 0"),
    ("[{after_epochs: 1.5, gradient_mode: bptt}]", "got 1.5"),
    ("[{after_steps: 3, after_epochs: 1, gradient_mode: bptt}]", "exactly one of after_steps / after_epochs"),
    ("[{gradient_mode: bptt}]", "exactly one of after_steps / after_epochs"),
    ("[{after_steps: 3, gradient_mode: bptt, mode: dsf}]", "unknown key(s) ['mode']"),
    ("[{after_steps: 5, gradient_mode: bptt}, {after_steps: 3, gradient_mode: dsf}]", "must increase, got [5, 3]"),
    ("[{after_steps: 5, gradient_mode: bptt}, {after_epochs: 3, gradient_mode: dsf}]", "mixes"),
    ("[bptt]", "got ['bptt']"),
])
def test_a_bad_schedule_is_refused_naming_the_entry(tmp_path, schedule, named):
    with pytest.raises(ConfigError) as error:
        tiny_experiment(tmp_path, f"training.gradient_mode_schedule={schedule}")
    assert named in str(error.value)


def test_the_callback_names_a_bad_initial_mode():
    with pytest.raises(ValueError, match="'dfs'"):
        GradientModeSchedule("dfs", parse_schedule([{"after_steps": 1, "gradient_mode": "bptt"}]))


def test_a_run_recorded_before_the_schedule_existed_resumes_without_a_change(tmp_path):
    from sfrnn_hf.training.run_folder import changed_settings

    experiment = tiny_experiment(tmp_path)
    recorded = experiment.to_dict()
    del recorded["training"]["gradient_mode_schedule"]  # an experiment.yaml written by an older version
    assert changed_settings(recorded, experiment.to_dict()) == []
    assert changed_settings(recorded, tiny_experiment(tmp_path, SWITCH_AT_3).to_dict()) == [
        "training.gradient_mode_schedule: [] -> [{'after_steps': 3, 'gradient_mode': 'bptt'}]"]
