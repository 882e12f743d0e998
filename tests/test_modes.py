"""One forward for every mode: the same values and loss; eval builds no graph; the mode switches on a live model."""

import pytest
import torch

from references import padded_batch
from sfrnn_hf import CELL_TYPES, SfrnnConfig, SfrnnForCausalLM
from sfrnn_hf import backends_sfrnn

MODES = ("bptt", "dsf", "ft_bptt")


def tiny(cell, block="residual", **kw):
    config = SfrnnConfig(vocab_size=29, hidden_size=16, num_hidden_layers=2, cell_type=cell, block_type=block, **kw)
    return SfrnnForCausalLM(config)


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_forward_and_loss_agree_across_modes(cell, padding):
    model = tiny(cell, "prenorm")
    input_ids, labels, mask = padded_batch(29, 3, 12, padding)
    outputs = {}
    for mode in MODES:
        model.config.gradient_mode = mode
        outputs[mode] = model(input_ids=input_ids, labels=labels, attention_mask=mask, return_logits=True)
    # dsf and ft_bptt run the same forward: bit-identical. bptt's autograd-enabled fused kernel may round the
    # last bit differently from the inference kernel (oneDNN), hence fp32 rounding tolerance there.
    assert torch.equal(outputs["dsf"].logits, outputs["ft_bptt"].logits)
    torch.testing.assert_close(outputs["bptt"].logits, outputs["dsf"].logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["bptt"].loss, outputs["dsf"].loss, rtol=1e-6, atol=1e-6)


def test_eval_forward_builds_no_graph_and_no_recompute(monkeypatch):
    model = tiny("gru").eval()

    def fail(*args, **kwargs):
        raise AssertionError("the DSF recompute ran in a no-grad forward")

    monkeypatch.setattr(backends_sfrnn, "dsf_states", fail)
    input_ids, _, mask = padded_batch(29, 3, 12, "right")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    assert logits.grad_fn is None and not logits.requires_grad


def test_switching_mode_on_a_live_model_takes_effect_at_next_forward():
    torch.manual_seed(3)
    model = tiny("gru")
    with torch.no_grad():
        for block in model.model.layers:
            block.recurrent.weight_hh.mul_(4)
    input_ids, labels, _ = padded_batch(29, 3, 12, None)
    weight_hh = model.model.layers[0].recurrent.weight_hh

    def grad_in(mode):
        model.config.gradient_mode = mode
        return torch.autograd.grad(model(input_ids=input_ids, labels=labels).loss, weight_hh)[0]

    first = {mode: grad_in(mode) for mode in MODES}
    assert not torch.allclose(first["bptt"], first["dsf"], rtol=1e-3)
    assert not torch.allclose(first["dsf"], first["ft_bptt"], rtol=1e-3)
    for mode in reversed(MODES):  # back and forth: each mode gives its own gradient again
        torch.testing.assert_close(grad_in(mode), first[mode])


@pytest.mark.parametrize("cell", CELL_TYPES)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_bf16_autocast_runs_every_cell_and_mode(cell, mode):
    # torch's oneDNN LSTM has no bf16 kernel on CPUs without native bf16: the recurrence must not be sent there.
    model = tiny(cell, "prenorm", gradient_mode=mode)
    input_ids, labels, mask = padded_batch(29, 3, 12, "right")
    reference = model(input_ids=input_ids, labels=labels, attention_mask=mask).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=labels, attention_mask=mask).loss
        with torch.no_grad():
            model.eval()
            generated = model.generate(input_ids[:1, :4], max_new_tokens=3, do_sample=False)
            model.train()
    loss.backward()
    assert generated.shape == (1, 7)
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()  # bf16 linear layers: ~1% of the loss
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
