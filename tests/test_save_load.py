"""Checkpoints: safetensors round trips through the Auto classes with identical logits and the feedback restored."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM, SfrnnModel


@pytest.mark.parametrize("cell, block", [("gru", "residual"), ("lstm", "prenorm"), ("rnn", "prenorm")])
def test_round_trip_through_auto_classes(tmp_path, cell, block):
    config = SfrnnConfig(vocab_size=37, hidden_size=10, num_hidden_layers=2, cell_type=cell, block_type=block,
                         feedback_min=0.1, feedback_max=0.9)
    model = SfrnnForCausalLM(config).eval()
    with torch.no_grad():  # a feedback no init would produce: it must come from the checkpoint
        model.model.layers[1].recurrent.feedback.copy_(torch.rand(model.model.layers[1].recurrent.state_size))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "sfrnn"

    input_ids = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        want = model(input_ids=input_ids)
        causal = AutoModelForCausalLM.from_pretrained(tmp_path)
        base = AutoModel.from_pretrained(tmp_path)
        assert isinstance(causal, SfrnnForCausalLM) and isinstance(base, SfrnnModel)
        assert torch.equal(causal(input_ids=input_ids).logits, want.logits)
        hidden = model.model(input_ids=input_ids).last_hidden_state
        assert torch.equal(base(input_ids=input_ids).last_hidden_state, hidden)
    for loaded in (causal.model, base):
        for ours, theirs in zip(model.model.layers, loaded.layers):
            assert torch.equal(ours.recurrent.feedback, theirs.recurrent.feedback)


def test_init_covers_every_parameter_and_buffer():
    # v5 builds on the meta device and fills missing tensors from `_init_weights`: nothing may stay garbage.
    config = SfrnnConfig(vocab_size=37, hidden_size=10, num_hidden_layers=3, cell_type="lstm", block_type="prenorm",
                         feedback_min=0.2, feedback_max=0.7)
    model = AutoModelForCausalLM.from_config(config)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    for block in model.model.layers:
        torch.testing.assert_close(block.recurrent.feedback, torch.linspace(0.2, 0.7, 20))
        assert block.recurrent.weight_hh.abs().max() <= 1 / 10**0.5
        # GPT-2 residual scaling of the last linear layer of each residual branch
        assert block.mlp.down_proj.weight.std() < 0.02 / 6**0.5 * 1.5
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.005


def test_missing_feedback_in_checkpoint_is_reinitialised(tmp_path):
    from safetensors.torch import load_file, save_file

    config = SfrnnConfig(vocab_size=37, hidden_size=10, num_hidden_layers=2)
    SfrnnForCausalLM(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights = {k: v for k, v in weights.items() if not k.endswith("feedback")}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for block in loaded.model.layers:
        torch.testing.assert_close(block.recurrent.feedback, torch.linspace(0, 1, 10))


def test_tied_embeddings_when_asked():
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=37, hidden_size=10, tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    untied = SfrnnForCausalLM(SfrnnConfig(vocab_size=37, hidden_size=10))
    assert untied.lm_head.weight.data_ptr() != untied.model.embeddings.weight.data_ptr()
