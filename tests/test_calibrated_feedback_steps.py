"""A calibrated feedback moves only when its statistics are applied once per optimizer step. Forgetting to apply them
is warned at the first forward after an optimizer step that left them pending (not after hundreds of forwards), and
never while a step's micro-batches accumulate; the Trainer callback that applies them is reachable from a loaded
model, remote code included."""

import pytest
import torch
from transformers.utils import logging

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from test_hub_export import NO_PACKAGE, run_as_user

WARNING = "An optimizer step passed without moving the calibrated feedback"


def calibrated_model():
    return SfrnnForCausalLM(SfrnnConfig(vocab_size=23, hidden_size=8, num_hidden_layers=2, gradient_mode="dsf_calibrated",
                                        feedback_momentum=0.5))


def train(model, steps, micro_batches, apply_statistics, log):
    """A hand-written loop; returns the number of the forward (1-based) at which `log` first holds the warning."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    forwards = 0
    for _ in range(steps):
        for _ in range(micro_batches):
            ids = torch.randint(0, 23, (2, 7))
            model(input_ids=ids, labels=ids).loss.backward()
            forwards += 1
            if WARNING in log.getvalue():
                return forwards
        optimizer.step()
        optimizer.zero_grad()
        if apply_statistics:
            model.update_calibrated_feedback()
    return None


@pytest.fixture
def log():
    """The `transformers`-style logger of the package captured; `warning_once` forgets what it already said."""
    import io
    import logging as std_logging

    logging.get_logger("sfrnn_hf").warning_once.cache_clear()
    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    root = logging.get_logger("sfrnn_hf")
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    logging.get_logger("sfrnn_hf").warning_once.cache_clear()


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_step_that_leaves_statistics_pending_is_warned_at_the_next_forward(log, micro_batches):
    model = calibrated_model().train()
    assert train(model, steps=3, micro_batches=micro_batches, apply_statistics=False, log=log) == micro_batches + 1


def test_no_warning_when_each_step_applies_the_statistics(log):
    model = calibrated_model().train()
    before = model.model.layers[0].recurrent.feedback.clone()
    assert train(model, steps=4, micro_batches=2, apply_statistics=True, log=log) is None
    assert not torch.equal(model.model.layers[0].recurrent.feedback, before)


PLAIN_TRAINER = """
sys.stderr = sys.stdout  # the warnings in order with the prints
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging

rows = [{"input_ids": list(range(i, i + 6)), "labels": list(range(i, i + 6))} for i in range(8)]
for with_callback in (False, True):
    logging.get_logger("any").warning_once.cache_clear()  # each run may warn anew
    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)
    assert "sfrnn_hf" not in type(model).__module__
    before = model.model.layers[0].recurrent.feedback.clone()
    callbacks = [model.calibrated_feedback_callback()] if with_callback else []
    args = TrainingArguments(output_dir=OUT, max_steps=3, per_device_train_batch_size=2, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks).train()
    moved = (model.model.layers[0].recurrent.feedback - before).abs().max().item()
    print(f"callback={with_callback} moved={moved > 0}", flush=True)
"""


def test_a_plain_trainer_warns_without_the_callback_and_calibrates_with_it_in_remote_code(tmp_path):
    folder = tmp_path / "saved"
    calibrated_model().save_pretrained(folder)
    code = NO_PACKAGE + f"FOLDER, OUT = {str(folder)!r}, {str(tmp_path / 'out')!r}\n" + PLAIN_TRAINER
    output = run_as_user(tmp_path, code)
    without, with_callback = output.split("callback=False")[0], output.split("callback=False")[1]
    assert WARNING in without and "callback=False moved=False" in output, output[-3000:]
    assert WARNING not in with_callback and "callback=True moved=True" in output, output[-3000:]
