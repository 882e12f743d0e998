"""BPTT mode is exact: outputs and every gradient equal those of torch.nn.GRU / LSTM / RNN holding the same weights,
single layer and a 3-layer residual model; and weights move between those modules and ours without conversion."""

import pytest
import torch
import torch.nn.functional as F

from references import causal_lm_cross_entropy, padded_batch, reference_causal_lm_logits, reference_exact_layer, torch_rnn_copy, \
    TORCH_RNNS
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.recurrent_sfrnn import SfrnnRecurrentLayer

CELLS = [cell for cell in CELL_TYPES if cell in TORCH_RNNS]  # the cells torch has a module for


def layer_for(cell, hidden=16):
    config = SfrnnConfig(hidden_size=hidden, cell_type=cell, gradient_mode="bptt")
    layer = SfrnnRecurrentLayer(config)
    with torch.no_grad():
        for weight in (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh):
            weight.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize("cell", CELLS)
def test_single_layer_equals_torch_module(cell):
    layer = layer_for(cell)
    rnn = torch_rnn_copy(layer)
    x = torch.randn(4, 20, 16, requires_grad=True)
    upstream = torch.randn(4, 20, 16)

    ours, final_state = layer(x, need_final_state=True)
    theirs, torch_final = rnn(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch_final = torch.cat(torch_final, -1)[0] if cell == "lstm" else torch_final[0]
    torch.testing.assert_close(final_state, torch_final, rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad((ours * upstream).sum(), [x, layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh])
    torch_params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    torch_grads = torch.autograd.grad((theirs * upstream).sum(), [x] + torch_params)
    for name, got, want in zip(["input", "weight_ih", "weight_hh", "bias_ih", "bias_hh"], grads, torch_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_weights_load_from_torch_module_without_conversion(cell):
    rnn = torch.nn.modules.rnn.__dict__[{"gru": "GRU", "lstm": "LSTM", "rnn": "RNN"}[cell]](8, 8, batch_first=True)
    layer = SfrnnRecurrentLayer(SfrnnConfig(hidden_size=8, cell_type=cell))
    state = {name.removesuffix("_l0"): value for name, value in rnn.state_dict().items()}
    layer.load_state_dict({**state, "feedback": torch.linspace(0, 1, layer.state_size)})
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], rnn(x)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_three_layer_model_equals_stack_of_torch_modules(cell):
    config = SfrnnConfig(vocab_size=31, hidden_size=12, num_hidden_layers=3, cell_type=cell, gradient_mode="bptt")
    model = SfrnnForCausalLM(config)
    torch_rnns = [torch_rnn_copy(block.recurrent) for block in model.model.layers]
    input_ids, labels, _ = padded_batch(31, 3, 15, None)

    logits = model(input_ids=input_ids).logits
    x = model.model.embeddings(input_ids)
    for rnn in torch_rnns:
        x = x + rnn(x)[0]
    torch_logits = model.lm_head(x)
    torch.testing.assert_close(logits, torch_logits, rtol=1e-5, atol=1e-6)

    ours = torch.autograd.grad(causal_lm_cross_entropy(logits, labels), [b.recurrent.weight_hh for b in model.model.layers])
    theirs = torch.autograd.grad(causal_lm_cross_entropy(torch_logits, labels), [r.weight_hh_l0 for r in torch_rnns])
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_bptt_equals_gated_loop_of_torch_cells(cell, padding):
    # Padding: the gated update `h_t = m_t f(x_t, h_{t-1}) + (1 - m_t) h_{t-1}`, exact gradients through it.
    config = SfrnnConfig(vocab_size=19, hidden_size=6, num_hidden_layers=2, cell_type=cell, gradient_mode="bptt",
                         block_type="prenorm", intermediate_size=8)
    model = SfrnnForCausalLM(config).double()
    input_ids, labels, mask = padded_batch(19, 3, 10, padding)
    params = list(model.parameters())
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    grads = torch.autograd.grad(causal_lm_cross_entropy(logits, labels), params)
    ref_logits = reference_causal_lm_logits(model, input_ids, mask, reference_exact_layer)
    ref_grads = torch.autograd.grad(causal_lm_cross_entropy(ref_logits, labels), params)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-10, atol=1e-12)
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=name)


def test_model_loss_is_next_token_cross_entropy_ignoring_pads():
    config = SfrnnConfig(vocab_size=19, hidden_size=6)
    model = SfrnnForCausalLM(config)
    input_ids, labels, mask = padded_batch(19, 3, 10, "right")
    out = model(input_ids=input_ids, labels=labels, attention_mask=mask, return_logits=True)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 19), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    # The training loss without logits (the output layer at labelled positions only) is the same number.
    torch.testing.assert_close(model(input_ids=input_ids, labels=labels, attention_mask=mask).loss, want)
