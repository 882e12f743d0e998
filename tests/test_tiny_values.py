"""Decayed embedding rows (what weight decay and Adam leave of rows the loss never reaches, `<pad>` and `<eos>` when
nothing follows it: values from 1e-42 to 7e-38, subnormal or just above) reach the recurrence as zeros, so CPU matmuls
meet no subnormal operand or product and keep their speed, and nothing else changes: the loss and every gradient
equal those of the same model with those rows exactly zero and no flush."""

import copy

import pytest
import torch

from sfrnn_hf import CELL_TYPES, GRADIENT_MODES, SfrnnConfig, SfrnnForCausalLM, modeling_sfrnn
from sfrnn_hf.modeling_sfrnn import flush_tiny_values

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.2e-38
FLOOR = 1.1e-19  # about sqrt(TINY): a product of two values above it is normal
PAD, EOS = 0, 2


def decayed_row(width: int) -> torch.Tensor:
    """Values spread over 1e-42 .. 7e-38 with mixed signs, as the protocol run's `<pad>` row at step 6400."""
    signs = torch.where(torch.arange(width) % 3 == 0, -1.0, 1.0)
    return signs * torch.logspace(-42, -37.15, width)


def test_flush_tiny_values_zeroes_what_could_underflow_and_passes_the_gradient_through():
    values = torch.tensor([1e-39, -1e-45, TINY, -7e-38, 1e-20, 3e-19, -3e-19, 1.0, -3e38, 0.0, float("inf"),
                           float("nan")], requires_grad=True)
    flushed = flush_tiny_values(values)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3e-19, -3e-19, 1.0, -3e38, 0.0, float("inf"), float("nan")])
    torch.testing.assert_close(flushed, expected, rtol=0, atol=0, equal_nan=True)
    (flushed * torch.arange(12.0)).sum().backward()
    assert torch.equal(values.grad, torch.arange(12.0))


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


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_decayed_embedding_rows_reach_the_recurrence_as_zeros_and_change_no_gradient(cell, mode, monkeypatch):
    config = SfrnnConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, cell_type=cell, gradient_mode=mode,
                         tie_word_embeddings=False)
    decayed = SfrnnForCausalLM(config).train()
    with torch.no_grad():
        decayed.get_input_embeddings().weight[[PAD, EOS]] = decayed_row(config.hidden_size)
    zero = copy.deepcopy(decayed)
    with torch.no_grad():
        zero.get_input_embeddings().weight[[PAD, EOS]] = 0.0

    seen = []
    decayed.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    batch = _padded_batch(config.vocab_size)
    losses = [decayed(**batch).loss]
    monkeypatch.setattr(modeling_sfrnn, "flush_tiny_values", lambda inputs: inputs)  # the reference: no flush at all
    losses.append(zero(**batch).loss)
    for loss in losses:
        loss.backward()

    block_input = seen[0]
    assert not ((block_input != 0) & (block_input.abs() < FLOOR)).any(), "a value below sqrt(tiny) reached the blocks"
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(decayed.named_parameters(), zero.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
