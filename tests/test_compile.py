"""torch.compile: `fullgraph=True` compiles the eval forward (padding and state cache included) with the eager model's
values; a training step compiles in every mode with the eager values and gradients, its recurrence run outside the
graph (a traced time loop is unrolled and recompiled for every sequence length), so `fullgraph=True` refuses it.
Tiny models: compiling is what costs here (seconds to a minute each on 2 CPU cores)."""

import copy

import pytest
import torch
import torch._dynamo

from references import padded_batch
from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM, recurrent_sfrnn

VOCAB = 23


def tiny(cell="gru", **kw):
    torch.manual_seed(0)
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, cell_type=cell, **kw)
    return SfrnnForCausalLM(config)


def recurrent_grads(model, batch):
    """Loss and the gradients of the recurrent weights, from one training forward and backward."""
    layer = model.model.layers[0].recurrent
    loss = model(**batch).loss
    return loss, torch.autograd.grad(loss, (layer.weight_ih, layer.weight_hh, layer.bias_hh))


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    """Each test starts as a fresh process: dynamo's caches empty, and no DSF backend logged yet (the first training
    forward logs it, which dynamo must not trace)."""
    monkeypatch.setattr(recurrent_sfrnn, "_logged_backends", set())
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_eval_forward_equals_eager_with_padding_and_cache():
    model = tiny("lstm").eval()
    input_ids, _, mask = padded_batch(VOCAB, 3, 7, "left")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=input_ids, attention_mask=mask, use_cache=True)
        want = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.past_key_values.get_state(0), want.past_key_values.get_state(0), rtol=1e-6,
                               atol=1e-6)
    assert got.past_key_values.get_seq_length() == 7


def test_a_compiled_training_step_in_every_mode_equals_eager():
    """The recurrence of a training forward runs outside the graph (eagerly); the rest of the model compiles."""
    model = tiny("gru").train()
    input_ids, labels, mask = padded_batch(VOCAB, 3, 7, "right")
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):  # (first: a cached graph would be reused)
        torch.compile(copy.deepcopy(model), fullgraph=True)(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    grads = {}
    for mode in ("bptt", "dsf", "ft_bptt"):
        model.config.gradient_mode = mode
        loss, grads[mode] = recurrent_grads(compiled, batch)
        want_loss, want = recurrent_grads(model, batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        for got, expected in zip(grads[mode], want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8, msg=mode)
    assert not torch.allclose(grads["dsf"][1], grads["bptt"][1])  # each mode's own gradient, not one reused
    assert not torch.allclose(grads["dsf"][1], grads["ft_bptt"][1])

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # and the whole step trains
    model.config.gradient_mode = "dsf"
    before = compiled(**batch).loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        compiled(**batch).loss.backward()
        optimizer.step()
    assert compiled(**batch).loss.item() < before


@pytest.mark.parametrize("mode", ["bptt", "dsf"])
def test_new_sequence_lengths_do_not_recompile_a_training_step(mode):
    """A Trainer's padded batches change length at every step: a traced time loop was unrolled and compiled anew for
    each length (minutes a step). Once dynamo marks the length dynamic, further lengths reuse the graphs."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = tiny("gru", gradient_mode=mode).train()
    compiled = torch.compile(model, backend=counting_backend)
    compiled_graphs = []
    for length in (5, 6, 8, 11, 13):
        input_ids, labels, mask = padded_batch(VOCAB, 3, length, "right")
        compiled(input_ids=input_ids, labels=labels, attention_mask=mask).loss.backward()
        compiled_graphs.append(len(graphs))
    assert compiled_graphs[1] == compiled_graphs[-1], compiled_graphs  # no graph after the second length


@pytest.mark.parametrize("settings", [{"gradient_mode": "diag_jacobian"}, {"gradient_mode": "dsf_calibrated"}])
def test_fused_op_modes_compile_with_a_graph_break_and_fullgraph_refuses_them(settings):
    model = tiny("gru", **settings).train()
    input_ids, labels, mask = padded_batch(VOCAB, 3, 7, "right")
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    eager = copy.deepcopy(model)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        torch.compile(copy.deepcopy(model), fullgraph=True)(**batch)
    loss, grads = recurrent_grads(torch.compile(model), batch)
    want_loss, want = recurrent_grads(eager, batch)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    # A calibrated feedback moved as in the eager step.
    torch.testing.assert_close(model.model.layers[0].recurrent.feedback, eager.model.layers[0].recurrent.feedback)
