"""Subnormal embedding rows (what weight decay and Adam leave of rows the loss never reaches: `<pad>`, `<eos>` when
nothing follows it) reach the recurrence as zeros, so CPU matmuls keep their speed, and nothing else changes: the
loss and every gradient equal those of the same model with those rows exactly zero."""

import copy

import pytest
import torch

from sfrnn_hf import GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf.modeling_sfrnn import flush_subnormals

TINY = torch.finfo(torch.float32).tiny
PAD, EOS = 0, 2


def test_flush_subnormals_zeroes_only_subnormals_and_passes_the_gradient_through():
    values = torch.tensor([1e-39, -1e-39, 1e-45, TINY, -TINY, 1.0, -3e38, 0.0, float("inf"), float("nan")],
                          requires_grad=True)
    flushed = flush_subnormals(values)
    expected = torch.tensor([0.0, 0.0, 0.0, TINY, -TINY, 1.0, -3e38, 0.0, float("inf"), float("nan")])
    torch.testing.assert_close(flushed, expected, rtol=0, atol=0, equal_nan=True)
    (flushed * torch.arange(10.0)).sum().backward()
    assert torch.equal(values.grad, torch.arange(10.0))


def _padded_batch(vocab, batch=4, time=9):
    """Right-padded rows `<x ...> <eos> <pad> ...` of different lengths, pads ignored by the loss."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (batch, time), generator=generator)
    mask = torch.zeros(batch, time, dtype=torch.long)
    for row, length in enumerate((time, 6, 3, 5)[:batch]):
        input_ids[row, length - 1] = EOS
        input_ids[row, length:] = PAD
        mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_subnormal_embedding_rows_reach_the_recurrence_as_zeros_and_change_no_gradient(cell, mode):
    config = SfrnnConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, cell_type=cell, gradient_mode=mode,
                         tie_word_embeddings=False)
    subnormal = SfrnnForCausalLM(config).train()
    with torch.no_grad():
        subnormal.get_input_embeddings().weight[[PAD, EOS]] = 1e-39
    zero = copy.deepcopy(subnormal)
    with torch.no_grad():
        zero.get_input_embeddings().weight[[PAD, EOS]] = 0.0

    seen = []
    subnormal.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    batch = _padded_batch(config.vocab_size)
    losses = [model(**batch).loss for model in (subnormal, zero)]
    for loss in losses:
        loss.backward()

    block_input = seen[0]
    assert not ((block_input != 0) & (block_input.abs() < TINY)).any(), "a subnormal value reached the recurrence"
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(subnormal.named_parameters(), zero.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
