"""Packed sequences (transformers' `DataCollatorWithFlattening`: several sequences end to end in a row, `position_ids`
restarting at 0, or `cu_seq_lens_q`) behave exactly like the same sequences in rows of their own: the recurrent state
restarts at each sequence start, in the forward, in every gradient mode's gradients, and in generation prefill."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM

VOCAB = 17
LENGTHS = (5, 3, 7, 1, 4)


def _model(cell, mode="dsf"):
    config = SfrnnConfig(vocab_size=VOCAB, hidden_size=6, num_hidden_layers=2, cell_type=cell, gradient_mode=mode)
    model = SfrnnForCausalLM(config).double()
    with torch.no_grad():  # weights large enough that a state leaking across a boundary changes the logits
        for block in model.model.layers:
            block.recurrent.weight_hh.mul_(3.0)
    return model


def _sequences():
    return [torch.randint(0, VOCAB, (n,)).tolist() for n in LENGTHS]


def _separate_logits(model, sequences):
    return torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in sequences])


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seq_lens_q"])
def test_packed_forward_equals_separate_rows(cell, boundaries):
    model = _model(cell).eval()
    sequences = _sequences()
    collator = DataCollatorWithFlattening(return_position_ids=boundaries == "position_ids",
                                          return_flash_attn_kwargs=boundaries == "cu_seq_lens_q")
    batch = collator([{"input_ids": s} for s in sequences])
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        unpacked_row = model(input_ids=batch["input_ids"]).logits[0]  # the same row read as one sequence
        want = _separate_logits(model, sequences)
    torch.testing.assert_close(packed, want, rtol=1e-12, atol=1e-12)
    assert (unpacked_row - want).abs().max() > 1e-3  # the test can fail: without restarts the state leaks


def test_packed_rows_with_padding_and_a_cache_continue_their_first_sequence():
    model = _model("gru").eval()
    a, b, c, d = (torch.randint(0, VOCAB, (n,)) for n in (4, 5, 5, 2))
    # Row 0 continues a cached prefix with `a` (positions 4..7), then `b` starts anew. Row 1: `c`, `d`, two pads.
    input_ids = torch.stack([torch.cat([a, b]), torch.cat([c, d, torch.zeros(2, dtype=torch.long)])])
    position_ids = torch.tensor([[4, 5, 6, 7, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1, 0, 0]])
    mask = torch.tensor([[1] * 9, [1] * 7 + [0, 0]])
    prefix = torch.randint(0, VOCAB, (2, 4))
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True)
        want_a = model(input_ids=a[None], past_key_values=model(input_ids=prefix[:1], use_cache=True).past_key_values,
                       use_cache=True).logits[0]
        want_b = model(input_ids=b[None], use_cache=True)
        want_c = model(input_ids=c[None]).logits[0]
        want_d = model(input_ids=d[None], use_cache=True)
    torch.testing.assert_close(out.logits[0, :4], want_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits[0, 4:], want_b.logits[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits[1, :5], want_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.logits[1, 5:7], want_d.logits[0], rtol=1e-12, atol=1e-12)
    # The cache now holds each row's last sequence's state (row 1's padding holds it).
    for layer in range(2):
        torch.testing.assert_close(out.past_key_values.get_state(layer)[0], want_b.past_key_values.get_state(layer)[0])
        torch.testing.assert_close(out.past_key_values.get_state(layer)[1], want_d.past_key_values.get_state(layer)[0])


@pytest.mark.parametrize("mode", GRADIENT_MODES)
@pytest.mark.parametrize("cell", CELL_TYPES)
def test_packed_gradients_equal_separate_rows_in_every_mode(cell, mode):
    # DSF's reverse scan must not carry credit across a boundary either: every gradient must be the separate rows'.
    model = _model(cell, mode).train()
    sequences = _sequences()
    batch = DataCollatorWithFlattening()([{"input_ids": s} for s in sequences])
    loss = model(**batch).loss
    named = [(name, p) for name, p in model.named_parameters() if p.numel()]  # minGRU's weight_hh is empty
    got = torch.autograd.grad(loss, [p for _, p in named])
    total, count = 0.0, 0
    for s in sequences:  # reference: each sequence alone, next-token cross-entropy summed, / all predicted tokens
        logits = model(input_ids=torch.tensor([s]), return_logits=True).logits[0]
        total = total + F.cross_entropy(logits[:-1], torch.tensor(s[1:], dtype=torch.long), reduction="sum")
        count += len(s) - 1
    want = torch.autograd.grad(total / count, [p for _, p in named])
    torch.testing.assert_close(loss, total / count, rtol=1e-12, atol=0)
    for (name, _), g, w in zip(named, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


def test_generation_prefill_restarts_at_each_packed_prompt():
    model = _model("lstm").eval()
    context, prompt = torch.randint(0, VOCAB, (6,)), torch.randint(0, VOCAB, (4,))
    packed = torch.cat([context, prompt])[None]
    position_ids = torch.cat([torch.arange(6), torch.arange(4)])[None]
    options = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(packed, position_ids=position_ids, **options)
        want = model.generate(prompt[None], **options)
        leaked = model.generate(packed, **options)
    assert torch.equal(got.sequences[0, 10:], want.sequences[0, 4:])
    for step, (g, w, wrong) in enumerate(zip(got.logits, want.logits, leaked.logits)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"token {step}")
    assert (leaked.logits[0] - want.logits[0]).abs().max() > 1e-3  # without the restart, the context leaks
