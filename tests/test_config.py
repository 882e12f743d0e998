"""SfrnnConfig: defaults, serialisation, and a ValueError naming the field for every invalid value."""

import pytest

from sfrnn_hf import SfrnnConfig


def test_defaults_are_the_papers():
    config = SfrnnConfig()
    assert (config.feedback_min, config.feedback_max) == (0.0, 1.0)
    assert config.block_type == "residual" and config.tie_word_embeddings is False
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.layer_types == ["linear_attention"] * config.num_hidden_layers


def test_round_trip_through_dict():
    config = SfrnnConfig(cell_type="lstm", gradient_mode="bptt", hidden_size=12, feedback_min=0.25)
    again = SfrnnConfig.from_dict(config.to_dict())
    for key in ("cell_type", "gradient_mode", "hidden_size", "feedback_min", "feedback_max", "block_type"):
        assert getattr(again, key) == getattr(config, key)


@pytest.mark.parametrize(
    "field, value",
    [
        ("cell_type", "transformer"),
        ("gradient_mode", "dfs"),
        ("block_type", "postnorm"),
        ("vocab_size", 0),
        ("hidden_size", -4),
        ("num_hidden_layers", 0),
        ("hidden_size", 3.5),
        ("intermediate_size", -1),
        ("feedback_min", -0.1),
        ("feedback_max", 1.5),
        ("initializer_range", 0.0),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SfrnnConfig(**{field: value})


def test_expose_cell_state_needs_lstm():
    with pytest.raises(ValueError, match="lstm_expose_cell_state"):
        SfrnnConfig(cell_type="gru", lstm_expose_cell_state=True)


@pytest.mark.parametrize("field, value", [("gradient_mode", "exact"), ("cell_type", "mamba"), ("block_type", "x")])
def test_invalid_assignment_names_the_field(field, value):
    config = SfrnnConfig()
    with pytest.raises(ValueError, match=field):
        setattr(config, field, value)


def test_valid_assignment_switches_mode():
    config = SfrnnConfig()
    for mode in ("bptt", "ft_bptt", "dsf"):
        config.gradient_mode = mode
        assert config.gradient_mode == mode
