"""SfrnnConfig: defaults, serialisation, and an error naming the field and the value for every invalid value (a strict
dataclass: `StrictDataclassError`, as transformers' own configs raise)."""

import pytest
from huggingface_hub.errors import StrictDataclassError

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
        ("initializer_range", float("inf")),
        ("layer_norm_eps", float("nan")),
        ("feedback_momentum", 1.0),
        ("dsf_backend", "cuda"),
        ("lstm_expose_cell_state", "yes"),
        ("feedback_max", True),
    ],
)
def test_invalid_value_names_the_field_and_the_value(field, value):
    with pytest.raises(StrictDataclassError, match=field) as raised:
        SfrnnConfig(**{field: value})
    message = str(raised.value)  # a range names it `got -0.1`, a type `(value: 3.5)`, a choice `got transformer`
    assert any(form in message for form in (f"got {value!r}", f"value: {value!r}", f"value {value!r}", f"got {value}")), \
        message


def test_numbers_may_be_written_as_integers():
    config = SfrnnConfig(feedback_min=0, feedback_max=1, initializer_range=1, layer_norm_eps=1)
    assert (config.feedback_min, config.feedback_max) == (0, 1)


def test_expose_cell_state_needs_lstm():
    with pytest.raises(StrictDataclassError, match="lstm_expose_cell_state"):
        SfrnnConfig(cell_type="gru", lstm_expose_cell_state=True)


@pytest.mark.parametrize("field, value", [("gradient_mode", "exact"), ("cell_type", "mamba"), ("block_type", "x"),
                                          ("feedback_max", 2.0), ("hidden_size", 0)])
def test_invalid_assignment_names_the_field(field, value):
    config = SfrnnConfig()
    with pytest.raises(StrictDataclassError, match=field):
        setattr(config, field, value)
    assert getattr(config, field) == getattr(SfrnnConfig, field)  # refused before it is set


def test_valid_assignment_switches_mode():
    config = SfrnnConfig()
    for mode in ("bptt", "ft_bptt", "dsf"):
        config.gradient_mode = mode
        assert config.gradient_mode == mode


def _warnings(caplog, logger):
    return [record.getMessage() for record in caplog.records if record.name == logger]


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(feedback_momentum=0.5), ("feedback_momentum=0.5", "gradient_mode='dsf'")),
        (dict(feedback_momentum=0.5, gradient_mode="diag_jacobian"), ("feedback_momentum=0.5", "'diag_jacobian'")),
        (dict(feedback_min=0.3, gradient_mode="ft_bptt"), ("feedback_min=0.3", "gradient_mode='ft_bptt'")),
        (dict(feedback_max=0.7, gradient_mode="bptt"), ("feedback_max=0.7", "gradient_mode='bptt'")),
        (dict(intermediate_size=100), ("intermediate_size=100", "block_type='residual'")),
        (dict(layer_norm_eps=1e-6), ("layer_norm_eps=1e-06", "block_type='residual'")),
    ],
)
def test_a_setting_without_effect_is_named_with_the_value_that_idles_it(caplog, settings, named):
    with caplog.at_level("WARNING", logger="sfrnn_hf.configuration_sfrnn"):
        SfrnnConfig(**settings)
    warnings = _warnings(caplog, "sfrnn_hf.configuration_sfrnn")
    assert len(warnings) == 1 and all(name in warnings[0] for name in named), warnings


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(gradient_mode="dsf_calibrated", feedback_momentum=0.5), dict(feedback_min=0.3, feedback_max=0.8),
     dict(gradient_mode="dsf_calibrated", feedback_min=0.3),
     dict(block_type="prenorm", intermediate_size=100, layer_norm_eps=1e-6), dict(gradient_mode="bptt")],
)
def test_settings_that_take_effect_are_not_warned_about(caplog, settings):
    with caplog.at_level("WARNING", logger="sfrnn_hf.configuration_sfrnn"):
        again = SfrnnConfig.from_dict(SfrnnConfig(**settings).to_dict())  # a saved config carries every field
    assert again.intermediate_size == (settings.get("intermediate_size") or 4 * again.hidden_size)
    assert not _warnings(caplog, "sfrnn_hf.configuration_sfrnn")


@pytest.mark.parametrize("settings, mode", [
    (dict(gradient_mode="dsf", feedback_type="calibrated"), "dsf_calibrated"),
    (dict(feedback_type="calibrated"), "dsf_calibrated"),
    (dict(gradient_mode="dsf", feedback_type="linspace"), "dsf"),
    (dict(gradient_mode="bptt", feedback_type="calibrated"), "bptt"),  # calibration had no effect outside dsf
])
def test_an_earlier_config_with_feedback_type_loads_on_the_one_axis(settings, mode):
    config = SfrnnConfig.from_dict(settings)
    assert config.gradient_mode == mode and "feedback_type" not in config.to_dict()
    with pytest.raises(ValueError, match="feedback_type.*'learned'"):
        SfrnnConfig(feedback_type="learned")
    with pytest.raises(AttributeError, match="dsf_calibrated"):
        config.feedback_type = "calibrated"  # no setting any more: it would change nothing


def test_print_model_shows_cell_sizes_mode_and_feedback():
    from sfrnn_hf import SfrnnForCausalLM

    model = SfrnnForCausalLM(SfrnnConfig(vocab_size=11, hidden_size=4, num_hidden_layers=2, cell_type="lstm",
                                         lstm_expose_cell_state=True, block_type="prenorm"))
    text = str(model)
    assert "layer_idx=0, block_type=prenorm" in text and "layer_idx=1, block_type=prenorm" in text
    assert ("SfrnnRecurrentLayer(cell_type=lstm, hidden_size=4, state_size=8, output_size=8, gradient_mode=dsf, "
            "feedback=linspace(0.0, 1.0))") in text
    model.config.gradient_mode = "bptt"  # the live mode, not the one at construction
    assert "gradient_mode=bptt, feedback=linspace(0.0, 1.0))" in str(model.model.layers[0].recurrent)
    model.config.gradient_mode = "dsf_calibrated"
    assert "gradient_mode=dsf_calibrated, feedback=calibrated (momentum 0.9))" in str(model.model.layers[0].recurrent)
