"""DSF and FT-BPTT gradients equal their definitions (per-timestep autograd of torch's own cells, with the state
gradient from a plain loop), for every cell, 1 and 3 layers, both block types, with and without padding."""

import pytest
import torch

from references import causal_lm_cross_entropy, padded_batch, reference_causal_lm_logits, reference_dsf_layer
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM

VOCAB = 23


def make_model(cell, layers, block, mode, expose=False, **overrides):
    config = SfrnnConfig(
        vocab_size=VOCAB, hidden_size=6, num_hidden_layers=layers, cell_type=cell, block_type=block,
        gradient_mode=mode, intermediate_size=10, lstm_expose_cell_state=expose, **overrides,
    )
    model = SfrnnForCausalLM(config).double()
    with torch.no_grad():  # larger weights than the init, so the recurrence matters and the modes differ
        model.model.embeddings.weight.normal_(0, 1.0)
        for block_module in model.model.layers:
            block_module.recurrent.weight_hh.mul_(3.0)
    return model


def model_and_reference_grads(model, padding, feedback_of):
    input_ids, labels, mask = padded_batch(VOCAB, 3, 9, padding)
    named = [(n, p) for n, p in model.named_parameters() if p.numel()]  # a cell's empty weights (minGRU's W_hh) left out
    params = [p for _, p in named]
    # The same float64 loss on both sides (the model's own loss upcasts to fp32; it is tested elsewhere).
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    grads = torch.autograd.grad(causal_lm_cross_entropy(logits, labels), params)
    ref_logits = reference_causal_lm_logits(
        model, input_ids, mask, lambda layer, x, m: reference_dsf_layer(layer, x, m, feedback_of(layer))
    )
    ref_grads = torch.autograd.grad(causal_lm_cross_entropy(ref_logits, labels), params)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    return [n for n, _ in named], grads, ref_grads


CASES = [
    (cell, layers, block, padding)
    for cell in CELL_TYPES
    for layers in (1, 3)
    for block in ("residual", "prenorm")
    for padding in (None, "right", "left")
]


@pytest.mark.parametrize("cell, layers, block, padding", CASES)
def test_dsf_gradient_equals_definition(cell, layers, block, padding):
    model = make_model(cell, layers, block, "dsf")
    names, grads, ref_grads = model_and_reference_grads(model, padding, lambda layer: layer.feedback)
    for name, got, want in zip(names, grads, ref_grads):
        assert want.abs().max() > 0 or name.endswith("feedback"), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("cell, padding", [("gru", "right"), ("lstm", None), ("rnn", "left")])
def test_ft_bptt_gradient_equals_definition(cell, padding):
    model = make_model(cell, 2, "residual", "ft_bptt")
    names, grads, ref_grads = model_and_reference_grads(model, padding, lambda layer: None)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("block", ["residual", "prenorm"])
def test_lstm_exposing_cell_state_feeds_the_c_half(block):
    model = make_model("lstm", 2, block, "dsf", expose=True)
    names, grads, ref_grads = model_and_reference_grads(model, "right", lambda layer: layer.feedback)
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


def test_feedback_zero_is_exactly_ft_bptt():
    input_ids, labels, mask = padded_batch(VOCAB, 3, 9, "right")
    grads = {}
    for mode, bounds in (("dsf", (0.0, 0.0)), ("ft_bptt", (0.0, 1.0))):
        torch.manual_seed(1)
        model = make_model("gru", 2, "prenorm", mode, feedback_min=bounds[0], feedback_max=bounds[1])
        loss = causal_lm_cross_entropy(model(input_ids=input_ids, attention_mask=mask).logits, labels)
        grads[mode] = torch.autograd.grad(loss, list(model.parameters()))
    for got, want in zip(grads["dsf"], grads["ft_bptt"]):
        assert torch.equal(got, want)


def test_dsf_differs_from_ft_bptt_on_recurrent_weights():
    # Guards the tests above against a feedback that silently does nothing.
    input_ids, labels, mask = padded_batch(VOCAB, 3, 9, None)
    model = make_model("gru", 1, "residual", "dsf")
    grad = {}
    for mode in ("dsf", "ft_bptt"):
        model.config.gradient_mode = mode
        loss = model(input_ids=input_ids, labels=labels).loss
        grad[mode] = torch.autograd.grad(loss, [model.model.layers[0].recurrent.weight_hh])[0]
    assert (grad["dsf"] - grad["ft_bptt"]).abs().max() > 1e-3 * grad["ft_bptt"].abs().max()
