"""A training forward with labels runs the output layer only where a label counts; its loss and every gradient must
equal the full computation's (all positions' logits, then the cross-entropy), in every cell, gradient mode and padding
layout, with the Trainer's `num_items_in_batch` normalisation, and evaluation must still return full logits."""

import pytest
import torch
import torch.nn.functional as F

from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM

VOCAB = 23


def _model(cell, mode):
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=6, num_hidden_layers=2, cell_type=cell, gradient_mode=mode)
    return SfrnnForCausalLM(config).double().train()


def _batch(padding):
    input_ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    if padding == "right":
        mask[0, 6:] = 0
        mask[2, 3:] = 0
    elif padding == "left":
        mask[0, :4] = 0
        mask[1, :1] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    return input_ids, mask, labels


def _reference_loss(model, input_ids, mask, labels, num_items_in_batch=None):
    """Independent reference: logits at every position, next-token cross-entropy summed over labelled tokens."""
    logits = model(input_ids=input_ids, attention_mask=mask, return_logits=True).logits
    assert logits.shape == (*input_ids.shape, VOCAB)
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def _gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    # minGRU's recurrent weights are empty (no recurrent matmul): nothing to compare there.
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.numel()}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("mode", GRADIENT_MODES)
@pytest.mark.parametrize("cell", CELL_TYPES)
def test_labelled_positions_only_equal_the_full_loss_and_gradients(cell, mode, padding):
    model = _model(cell, mode)
    input_ids, mask, labels = _batch(padding)
    output = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert output.logits is None  # nothing (batch, time, vocab)-sized was built
    got = _gradients(model, output.loss)
    want_loss = _reference_loss(model, input_ids, mask, labels)
    want = _gradients(model, want_loss)
    torch.testing.assert_close(output.loss, want_loss, rtol=1e-12, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-14, msg=name)


def test_accumulated_micro_batches_with_num_items_in_batch_equal_one_batch():
    # The Trainer's gradient accumulation: each micro-batch's summed loss / the whole batch's token count.
    model = _model("gru", "dsf")
    input_ids, mask, labels = _batch("right")
    count = (labels[:, 1:] != -100).sum()
    accumulated = {}
    model.zero_grad(set_to_none=True)
    for rows in (slice(0, 1), slice(1, 3)):
        model(input_ids=input_ids[rows], attention_mask=mask[rows], labels=labels[rows],
              num_items_in_batch=count).loss.backward()
    accumulated = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    want = _gradients(model, _reference_loss(model, input_ids, mask, labels))
    for name in want:
        torch.testing.assert_close(accumulated[name], want[name], rtol=1e-10, atol=1e-14, msg=name)


def test_evaluation_returns_logits_and_the_same_loss():
    model = _model("lstm", "dsf").float()  # transformers' loss, used in evaluation, computes in fp32
    input_ids, mask, labels = _batch("right")
    training_loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    model.eval()
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert output.logits.shape == (3, 9, VOCAB)
    torch.testing.assert_close(output.loss, training_loss.detach(), rtol=1e-6, atol=0)  # fp32 summation order
    # In training without labels, a partial `logits_to_keep` still gives its logits.
    model.train()
    kept = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=2)
    assert kept.logits.shape == (3, 2, VOCAB)
