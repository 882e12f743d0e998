"""Training mechanics that must not change the mathematics: gradient accumulation (token-count normalisation with
padding), resuming from a checkpoint, gradient checkpointing."""

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.training.train import run
from training_helpers import logged_losses, tiny_experiment


class CaptureGradients(TrainerCallback):
    """The initial model, and the gradients just before the (first) optimizer step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial_model = copy.deepcopy(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "gradients"):
            self.gradients = {name: p.grad.clone() for name, p in model.named_parameters()}


def _token_mean_loss(model, batch):
    """Independent reference: summed next-token cross-entropy over every predicted token / their number."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum(), (labels != -100).sum()


@pytest.mark.parametrize("mode", ["dsf", "bptt"])
def test_accumulating_2_x_4_is_one_batch_of_8(tmp_path, mode):
    runs = {}
    for accumulation in (1, 2):
        capture = CaptureGradients()
        experiment = tiny_experiment(
            tmp_path / f"acc{accumulation}", f"model.gradient_mode={mode}", "data.max_train_samples=8",
            "training.batch_size=8", f"training.gradient_accumulation_steps={accumulation}", "training.max_steps=1",
            "training.train_sampling_strategy=sequential",
        )
        trainer, _ = run(experiment, callbacks=[capture])
        runs[accumulation] = (trainer, capture)
    (one, capture_one), (two, capture_two) = runs[1], runs[2]
    assert two.args.per_device_train_batch_size == 4 and one.args.per_device_train_batch_size == 8

    # Reference gradient: the token mean over the whole batch of 8, with the initial weights.
    reference_model = capture_one.initial_model
    batch = one.data_collator([one.train_dataset[i] for i in range(8)])
    loss, count = _token_mean_loss(reference_model, batch)
    loss.backward()
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    counts = [int((half["labels"][:, 1:] != -100).sum()) for half in halves]
    assert counts[0] != counts[1]  # padding makes the micro-batches unequal: the normalisation matters
    for name, parameter in reference_model.named_parameters():
        torch.testing.assert_close(capture_one.gradients[name], parameter.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(capture_two.gradients[name], parameter.grad, rtol=1e-5, atol=1e-7)
    # The test can fail: the mean of the two micro-batch means is a different gradient.
    naive = copy.deepcopy(capture_one.initial_model)
    (sum(_token_mean_loss(naive, half)[0] for half in halves) / 2).backward()
    gap = max((p.grad - q.grad).abs().max().item() for p, q in zip(naive.parameters(), reference_model.parameters()))
    assert gap > 1e-4
    # And the same update. Adam's first step is ~ lr * sign(g): where |g| is near rounding level (bptt's fused kernel
    # sums in a batch-dependent order, ~1e-9) the two runs may step differently, so compare where |g| > 1e-6.
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        significant = reference_model.get_parameter(name).grad.abs() > 1e-6
        torch.testing.assert_close(p[significant], q[significant], rtol=1e-5, atol=1e-7, msg=name)
    assert int(count) == sum(counts)


def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    # 24 sentences, batch 8: 3 steps an epoch; the checkpoint at step 4 sits inside the second epoch (random order).
    common = ["training.max_steps=7", "training.save_strategy=steps", "training.save_steps=4",
              "model.gradient_mode=dsf"]
    full, _ = run(tiny_experiment(tmp_path / "full", *common, train_lines=24))
    checkpoint = tmp_path / "full" / "run" / "checkpoint-4"
    assert checkpoint.is_dir()
    resumed, _ = run(tiny_experiment(tmp_path / "resumed", *common, f"training.resume_from_checkpoint={checkpoint}",
                                     train_lines=24))
    full_losses, resumed_losses = logged_losses(full), logged_losses(resumed)
    new_logs = [json.loads(line) for line in open(tmp_path / "resumed" / "run" / "log_history.jsonl")]
    assert [entry["step"] for entry in new_logs if "loss" in entry] == [5, 6, 7]  # only the remaining steps ran
    for step in (5, 6, 7):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=0)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0, msg=name)
    # Different data order after step 4 would have given different losses: the sampler state was restored.
    assert len({round(v, 6) for v in full_losses.values()}) == 7


class CountCalls:
    def __init__(self):
        self.calls = 0

    def __call__(self, module, args):  # a pre-hook: the recompute may stop early, before the forward returns
        self.calls += 1


@pytest.mark.parametrize("mode", ["bptt", "dsf", "ft_bptt"])
@pytest.mark.parametrize("block", ["residual", "prenorm"])
def test_gradient_checkpointing_gives_the_same_gradients(mode, block):
    config = SfrnnConfig(vocab_size=23, hidden_size=12, num_hidden_layers=3, gradient_mode=mode, block_type=block)
    plain = SfrnnForCausalLM(config).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()  # (transformers 5 name of gradient_checkpointing_enable)
    input_ids = torch.randint(0, 23, (3, 11))
    mask = torch.ones_like(input_ids)
    mask[1, 7:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    counter = CountCalls()
    checkpointed.model.layers[0].recurrent.register_forward_pre_hook(counter)
    for model in (plain, checkpointed):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    assert counter.calls == 2  # the block's forward really was recomputed in the backward
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_gradient_checkpointing_through_the_trainer(tmp_path):
    losses = {}
    for flag in ("false", "true"):
        trainer, _ = run(tiny_experiment(tmp_path / flag, f"training.gradient_checkpointing={flag}",
                                         "training.max_steps=3"))
        assert trainer.model.model.gradient_checkpointing == (flag == "true")
        losses[flag] = logged_losses(trainer)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6)


def test_seed_makes_runs_repeat_and_differ_across_seeds(tmp_path):
    losses = []
    for index, seed in enumerate((0, 0, 1)):
        trainer, _ = run(tiny_experiment(tmp_path / str(index), f"training.seed={seed}", "training.max_steps=3"))
        losses.append(logged_losses(trainer))
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_resuming_with_other_settings_warns_naming_each_one(tmp_path, caplog):
    common = ["training.save_strategy=steps", "training.save_steps=2"]
    run(tiny_experiment(tmp_path, *common, "training.max_steps=2"))
    # max_steps and the sampler differ from the run that wrote checkpoint-2; logging_steps may change freely.
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        run(tiny_experiment(tmp_path, *common, "training.max_steps=3", "training.resume_from_checkpoint=true",
                            "training.logging_steps=2", "training.train_sampling_strategy=sequential"))
    warnings = [record.getMessage() for record in caplog.records if record.name == "sfrnn_hf.training.train"]
    assert len(warnings) == 1
    assert "training.max_steps: 2 -> 3" in warnings[0]
    assert "training.train_sampling_strategy: 'random' -> 'sequential'" in warnings[0]
    assert "logging_steps" not in warnings[0] and "resume_from_checkpoint" not in warnings[0]
    # The settings of the resume it continues: no warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="sfrnn_hf.training.train"):
        run(tiny_experiment(tmp_path, *common, "training.max_steps=3", "training.resume_from_checkpoint=true",
                            "training.train_sampling_strategy=sequential"))
    assert not [record for record in caplog.records if record.name == "sfrnn_hf.training.train"]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("reentrant, early_stop", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("variant", ["dsf", "calibrated", "diag_jacobian", "bptt"])
def test_checkpointing_gives_the_same_gradients_and_feedback_step_after_step(cell, reentrant, early_stop, variant):
    # A calibrated feedback must move once per optimizer step, never inside a (re)computed forward; an LSTM's padded
    # batch must survive the reentrant recompute (its no-grad first pass returns what the recompute returns).
    config = SfrnnConfig(vocab_size=23, hidden_size=8, num_hidden_layers=2, cell_type=cell,
                         gradient_mode="dsf_calibrated" if variant == "calibrated" else variant, feedback_momentum=0.5)
    plain = SfrnnForCausalLM(config).double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    input_ids = torch.randint(0, 23, (3, 11))
    mask = torch.ones_like(input_ids)
    mask[1, 7:] = 0
    mask[2, 9:] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    optimizers = {id(model): torch.optim.SGD(model.parameters(), lr=0.5) for model in (plain, checkpointed)}
    start = plain.model.layers[0].recurrent.feedback.clone()
    for step in range(3):
        for model in (plain, checkpointed):
            optimizers[id(model)].zero_grad()
            with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
                model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-13, msg=f"step {step}: {name}")
        for model in (plain, checkpointed):
            optimizers[id(model)].step()
            assert model.update_calibrated_feedback() == (variant == "calibrated")
        for p, q in zip(plain.model.layers, checkpointed.model.layers):
            torch.testing.assert_close(q.recurrent.feedback, p.recurrent.feedback, rtol=1e-12, atol=0)
    assert torch.equal(plain.model.layers[0].recurrent.feedback, start) == (variant != "calibrated")


def test_calibrated_feedback_accumulating_2_x_4_is_one_batch_of_8_through_the_trainer(tmp_path):
    # Three optimizer steps: each step's feedback update must pool both micro-batches (one update per step), or the
    # second step's gradients, and everything after, differ. adam_eps=1 keeps Adam's step linear in the gradient,
    # so rounding-level gradient differences stay rounding-level in the weights.
    models = {}
    for accumulation in (1, 2):
        trainer, _ = run(tiny_experiment(
            tmp_path / f"acc{accumulation}", "model.gradient_mode=dsf_calibrated", "model.feedback_momentum=0.5", "data.max_train_samples=24", "training.batch_size=8",
            f"training.gradient_accumulation_steps={accumulation}", "training.max_steps=3", "training.adam_eps=1.0",
            "training.learning_rate=0.1", "training.train_sampling_strategy=sequential"))
        models[accumulation] = trainer.model
    one, two = models[1].state_dict(), models[2].state_dict()
    feedback = one["model.layers.0.recurrent.feedback"]
    assert not torch.allclose(feedback, torch.linspace(0, 1, feedback.numel()))  # it really moved
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
