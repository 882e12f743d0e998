"""A PEFT LoRA on the recurrent weights (`target_parameters`) is applied by the fused DSF path and trained through it:
the LoRA factors' gradients equal the chain rule from the reference DSF (and diag_jacobian) gradient on the merged
weight."""

import copy

import pytest
import torch

from references import causal_lm_cross_entropy, padded_batch, reference_causal_lm_logits, reference_dsf_layer
from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM
from test_diag_jacobian_mode import reference_diag_jacobian_layer

peft = pytest.importorskip("peft")

VOCAB = 19


REFERENCE_LAYERS = {
    "dsf": lambda layer, x, m: reference_dsf_layer(layer, x, m, layer.feedback),
    # diag(J) must come from the adapted weight_hh: the merged-weight reference sees only that one
    "diag_jacobian": reference_diag_jacobian_layer,
}


@pytest.mark.parametrize("mode", ["dsf", "diag_jacobian"])
@pytest.mark.parametrize("cell, padding", [("gru", "left"), ("lstm", "right"), ("rnn", None)])
def test_lora_factor_gradients_are_the_chain_rule_of_the_dsf_gradient(cell, padding, mode):
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=6, num_hidden_layers=2, cell_type=cell, gradient_mode=mode)
    model = SfrnnForCausalLM(config).double()
    with torch.no_grad():
        model.model.embeddings.weight.normal_(0, 1.0)
        for block in model.model.layers:
            block.recurrent.weight_hh.mul_(3.0)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["weight_hh"])
    peft_model = peft.get_peft_model(copy.deepcopy(model), lora)
    wrappers = [block.recurrent for block in peft_model.base_model.model.model.layers]
    factors = []
    for wrapper in wrappers:
        a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        with torch.no_grad():
            b.normal_(0, 0.3)  # B starts at zero: make the adapter change the weight, so A gets gradient too
        factors += [a, b]

    input_ids, labels, mask = padded_batch(VOCAB, 3, 9, padding)
    logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
    got = torch.autograd.grad(causal_lm_cross_entropy(logits, labels), factors)

    # Reference: the merged weights W + delta(A, B), the DSF gradient G by definition, then d<G, delta>/d(A, B).
    deltas = [wrapper.get_delta_weight("default") for wrapper in wrappers]
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for block, delta in zip(merged.model.layers, deltas):
            block.recurrent.weight_hh.add_(delta)
    ref_logits = reference_causal_lm_logits(merged, input_ids, mask, REFERENCE_LAYERS[mode])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    merged_weights = [block.recurrent.weight_hh for block in merged.model.layers]
    merged_grads = torch.autograd.grad(causal_lm_cross_entropy(ref_logits, labels), merged_weights)
    want = torch.autograd.grad(sum((g * delta).sum() for g, delta in zip(merged_grads, deltas)), factors)
    for g, w in zip(got, want):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    for wrapper in wrappers:  # the base weight is frozen, the fast path still ran with the adapted one
        assert not wrapper.base_layer.weight_hh.requires_grad
