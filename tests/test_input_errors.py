"""Bad input gets a ValueError naming the problem, before it reaches torch."""

import pytest
import torch

from sfrnn_hf import SfrnnConfig, SfrnnForCausalLM


@pytest.fixture(scope="module")
def model():
    return SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 11]])), "id 11"),
        (dict(input_ids=torch.tensor([[-1, 2]])), "id -1"),
        (dict(input_ids=torch.tensor([1, 2, 3])), "shape"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "Empty"),
        (dict(), "exactly one"),
        (dict(input_ids=torch.tensor([[1, 2]]), inputs_embeds=torch.zeros(1, 2, 4)), "exactly one"),
        (dict(inputs_embeds=torch.zeros(1, 2, 5)), "inputs_embeds"),
        (dict(inputs_embeds=torch.zeros(1, 2, 4, dtype=torch.long)), "floating"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(2, 2)), "attention_mask"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), "labels"),
        (dict(input_ids=torch.tensor([[1, 2]]), past_key_values=(torch.zeros(1, 4),)), "SfrnnCache"),
        (dict(input_ids=torch.tensor([[1, 2, 3, 4]]), cu_seq_lens_q=torch.tensor([0, 3, 2, 4])), "increase strictly"),
        (dict(input_ids=torch.tensor([[1, 2, 3, 4]]), cu_seq_lens_q=torch.tensor([1, 2, 4])), "start at 0"),
        (dict(input_ids=torch.tensor([[1, 2, 3, 4]]), cu_seq_lens_q=torch.tensor([[0, 2, 4]])), "1-D integer"),
        (dict(input_ids=torch.tensor([[1, 2, 3, 4]]), cu_seq_lens_q=torch.tensor([0.0, 4.0])), "1-D integer"),
    ],
)
def test_bad_input_names_the_problem(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_a_cache_from_another_model_is_rejected_even_when_the_widths_agree():
    # An LSTM with hidden 8 keeps [h, c]: 16 numbers a row, exactly a GRU-16 state. Accepted, it would be misread.
    lstm = SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=8, cell_type="lstm")).eval()
    gru = SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=16, cell_type="gru")).eval()
    input_ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        cache = lstm(input_ids=input_ids, use_cache=True).past_key_values
        assert cache.get_state(0).shape == (1, 16)
        with pytest.raises(ValueError, match="another model: cell_type 'lstm' \\(model: 'gru'\\), hidden_size 8"):
            gru(input_ids=input_ids, past_key_values=cache, use_cache=True)
        # The model's own cache goes on working.
        lstm(input_ids=input_ids, past_key_values=cache, use_cache=True)


def test_a_cache_whose_deeper_layer_has_the_wrong_width_is_rejected():
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=4, num_hidden_layers=2)).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[1, 2]]), use_cache=True).past_key_values
        cache.set_state(1, torch.zeros(1, 7))
        with pytest.raises(ValueError, match="layer 1"):
            model(input_ids=torch.tensor([[3]]), past_key_values=cache, use_cache=True)


def test_a_batch_without_a_labelled_token_has_loss_zero_not_nan(model):
    ids = torch.tensor([[1, 2, 3]])
    loss = model(input_ids=ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()  # and no NaN gradient either
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_mingru_runs_under_the_users_own_bf16_autocast_at_inference():
    torch.manual_seed(0)
    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=8, cell_type="mingru")).eval()
    ids = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)  # bf16 matmuls: close, not equal


@pytest.mark.parametrize("value", [5.0, float("nan")])
def test_a_checkpoint_with_a_tampered_feedback_is_refused_on_load(tmp_path, value):
    from safetensors.torch import load_file, save_file

    SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=4)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = next(key for key in weights if key.endswith("feedback"))
    weights[name][1] = value
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"feedback` holds {value}"):
        SfrnnForCausalLM.from_pretrained(tmp_path)
