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
    ],
)
def test_bad_input_names_the_problem(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)
