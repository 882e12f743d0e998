"""Configuration of sfrnn models: multi-layer GRU / LSTM / tanh-RNN language models whose backward is exact BPTT,
Diagonal State Feedbacks (DSF, arXiv 2503.23104) or fully truncated BPTT.

A strict dataclass as transformers' own configs are: each field's type (a `Literal` for a choice) and range is checked
when the config is built and on every assignment (`model.config.gradient_mode = "dfs"` fails at once, naming the
field), the rules between fields in `validate_*` methods; a bad value raises
`huggingface_hub.errors.StrictDataclassError` naming the field and the value.

Hub-exported file: imports only transformers (and huggingface_hub, its dependency) and its flat siblings `cells_sfrnn`
and `scan_sfrnn` (the registered cells and feedbacks).
"""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict, validated_field
from transformers import PreTrainedConfig
from transformers.utils import logging

from .cells_sfrnn import CELLS
from .scan_sfrnn import FEEDBACKS

logger = logging.get_logger(__name__)

CELL_TYPES = tuple(CELLS)
GRADIENT_MODES = ("bptt", *FEEDBACKS)  # exact BPTT, or the DSF rule with one of the feedbacks
BLOCK_TYPES = ("residual", "prenorm")
# Which op runs the DSF-family modes (`backends_sfrnn.resolve_dsf_backend`); "auto" picks by device.
DSF_BACKENDS = ("auto", "reference", "fused", "fused_kernel", "triton")


def in_range(low, high=None, low_open=False, high_open=False):
    """A field validator of `low <= value <= high` (an open end excludes its bound; NaN is outside); None passes (an
    unset optional). It runs after the field's type check."""
    def check(value):
        if value is None:
            return
        if not ((value > low if low_open else value >= low) and (
                high is None or (value < high if high_open else value <= high))):
            if high is None or high == math.inf:
                bound = "positive" if low == 0 and low_open else f"at least {low}"
                raise ValueError(f"must be {bound}{' and finite' if high else ''}, got {value!r}")
            raise ValueError(f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got "
                             f"{value!r}")
    return check


POSITIVE, POSITIVE_FINITE = in_range(0, low_open=True), in_range(0, math.inf, low_open=True, high_open=True)
UNIT_INTERVAL, HALF_OPEN_UNIT_INTERVAL = in_range(0, 1), in_range(0, 1, high_open=True)  # [0, 1], [0, 1)

# Earlier configs named the calibrated feedback on a second axis: `gradient_mode="dsf", feedback_type="calibrated"` is
# today's `gradient_mode="dsf_calibrated"` (outside `dsf` it had no effect).
LEGACY_FEEDBACK_TYPES = ("linspace", "calibrated")


def fold_feedback_type(settings: dict) -> dict:
    """`settings` (SfrnnConfig fields) with an earlier release's `feedback_type` folded into `gradient_mode`."""
    settings = dict(settings)
    legacy = settings.pop("feedback_type", None)
    if legacy is not None and legacy not in LEGACY_FEEDBACK_TYPES:
        raise ValueError(f"`feedback_type` must be one of {list(LEGACY_FEEDBACK_TYPES)} (earlier configs; today "
                         f"`gradient_mode='dsf_calibrated'`), got {legacy!r}.")
    if legacy == "calibrated" and settings.get("gradient_mode", "dsf") == "dsf":
        settings["gradient_mode"] = "dsf_calibrated"
    return settings


def settings_without_effect(config) -> list[str]:
    """Each setting that changes nothing in this configuration, as a sentence naming its value and the value that
    makes it idle. Fields at their class defaults are not reported (a saved config carries every field)."""

    def changed(name):
        return getattr(config, name) != getattr(type(config), name)

    notes = []
    if config.gradient_mode != "dsf_calibrated" and changed("feedback_momentum"):
        notes.append(f"`feedback_momentum={config.feedback_momentum}` has no effect with "
                     f"`gradient_mode={config.gradient_mode!r}`: it smooths the feedback of `dsf_calibrated` only.")
    if config.gradient_mode not in ("dsf", "dsf_calibrated"):
        for name in ("feedback_min", "feedback_max"):
            if changed(name):
                notes.append(f"`{name}={getattr(config, name)}` has no effect with "
                             f"`gradient_mode={config.gradient_mode!r}`: the feedback diagonal is used by `dsf` and "
                             "`dsf_calibrated` only.")
    if config.block_type == "residual":
        if config.intermediate_size not in (None, 4 * config.hidden_size):
            notes.append(f"`intermediate_size={config.intermediate_size}` has no effect with "
                         f"`block_type='residual'`: only prenorm blocks have an MLP.")
        if changed("layer_norm_eps"):
            notes.append(f"`layer_norm_eps={config.layer_norm_eps}` has no effect with `block_type='residual'`: "
                         f"only prenorm blocks have LayerNorms.")
    return notes


@strict
class SfrnnConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size (`int`): number of tokens.
        hidden_size (`int`): width `d` of the embeddings and of every recurrent state.
        num_hidden_layers (`int`): number of blocks.
        cell_type (`str`): `"gru"`, `"lstm"`, `"rnn"` (tanh Elman), `"mingru"` (Feng et al. 2024: gates from the
            input only, so its Jacobian is diagonal) or `"indrnn"` (Li et al. 2018, tanh: a vector recurrent weight,
            so its Jacobian is diagonal). Weights use the layout and gate order of `torch.nn.GRU` / `nn.LSTM` /
            `nn.RNN` (IndRNN: `weight_hh` a vector `(d,)`); every cell is defined in `cells_sfrnn.py`.
        gradient_mode (`str`): how the state gradient is computed in training:
            `"bptt"` exact backpropagation through time (torch's fused kernels),
            `"dsf"` the diagonal state feedback `g_t = e_t + feedback * g_{t+1}`,
            `"dsf_calibrated"` DSF whose diagonal moves towards the units' own memory (below),
            `"ft_bptt"` fully truncated (`g_t = e_t`),
            `"diag_jacobian"` the time-varying diagonal `g_t = e_t + diag(J_{t+1}) * g_{t+1}` (beyond the paper: each
            unit's own memory, from the gates the forward saved). Forward values are identical in every mode, and the mode may
            be changed on a live model (`model.config.gradient_mode = "bptt"`): it applies at the next forward.
        feedback_min, feedback_max (`float`): the fixed feedback diagonal is `linspace(feedback_min, feedback_max, S)`
            over the `S` state entries of a layer (`S = d`, or `2d` for the LSTM's `[h, c]`). The paper: 0 and 1.
        (`dsf_calibrated`, beyond the paper): starting from
            that diagonal, every optimizer step moves it towards the step's mean diag(J_t) of each unit,
            `a <- clamp(m a + (1 - m) mean, 0, 1)` with `m = feedback_momentum`; saved with the checkpoint. The
            mean covers all the step's micro-batches and, under torch.distributed, all processes: accumulation and
            gradient checkpointing give the feedback and gradients of one large batch. Training forwards record the
            statistics; `model.update_calibrated_feedback()` applies them once per optimizer step (the Trainer of
            `sfrnn-train` calls it through `CalibratedFeedbackCallback`; a hand-written loop calls it after
            `optimizer.step()`). A config of earlier releases, `gradient_mode="dsf", feedback_type="calibrated"`,
            loads as `gradient_mode="dsf_calibrated"`.
        feedback_momentum (`float`): `m` above, in [0, 1).
        dsf_backend (`str`): the op that runs `dsf`, `ft_bptt` and `diag_jacobian`, all computing the same gradients:
            `"auto"` (the measured fastest for the device: `fused` on CPU, `triton` on CUDA with Triton for a cell
            with a Triton backward, else `fused_kernel`, `reference` elsewhere), `"reference"` (autograd of the one-step recompute: the readable
            definition), `"fused"` (loop forward saving the gates, chunked torch backward), `"fused_kernel"` (torch's
            fused kernel forward, gates recomputed batched, torch backward), `"triton"` (as `fused_kernel` with the
            backward's scan and pointwise derivative in one Triton kernel). Resolved once per layer and device.
        block_type (`str`): `"residual"` (the paper's PTB model, `x = x + RNN(x)`) or `"prenorm"` (the paper's
            WikiText-103 block: `x = x + Linear(RNN(LN(x)))`, `x = x + MLP(LN(x))`, final LN).
        intermediate_size (`int`, *optional*): width of the prenorm MLP; defaults to `4 * hidden_size`.
        lstm_expose_cell_state (`bool`): LSTM only. When true the layer hands `[h, c]` (2d) to the block's output
            projection (the paper's variant), so the `c` half of the feedback receives error. Off by default: then
            the layer's output is `h`, exactly as `nn.LSTM`, and the residual block needs no projection; the cost is
            that the `c` half of the state gradient is only fed through `h` within each step.
        layer_norm_eps (`float`): epsilon of the LayerNorms (prenorm blocks).
        initializer_range (`float`): std of the normal init of embeddings and linear layers; the last linear layer of
            each residual branch uses `initializer_range / sqrt(2 * num_hidden_layers)` (GPT-2). Recurrent weights use
            torch's `U(-1/sqrt(d), 1/sqrt(d))`.

    A setting that changes nothing in the configuration it is part of (`feedback_momentum` outside `dsf_calibrated`,
    `feedback_min` / `feedback_max` outside the DSF modes, `intermediate_size` or `layer_norm_eps` in residual blocks)
    is named in a warning when the config is built (`settings_without_effect`).
    """

    model_type = "sfrnn"
    keys_to_ignore_at_inference = ["past_key_values"]  # the Trainer's evaluation must not gather the state cache

    vocab_size: int = validated_field(POSITIVE, default=10000)
    hidden_size: int = validated_field(POSITIVE, default=256)
    num_hidden_layers: int = validated_field(POSITIVE, default=1)
    cell_type: Literal[CELL_TYPES] = "gru"
    gradient_mode: Literal[GRADIENT_MODES] = "dsf"
    feedback_min: float | int = validated_field(UNIT_INTERVAL, default=0.0)  # in [0, 1]: a contracting feedback
    feedback_max: float | int = validated_field(UNIT_INTERVAL, default=1.0)
    feedback_momentum: float | int = validated_field(HALF_OPEN_UNIT_INTERVAL, default=0.9)
    dsf_backend: Literal[DSF_BACKENDS] = "auto"
    block_type: Literal[BLOCK_TYPES] = "residual"
    intermediate_size: int | None = validated_field(POSITIVE, default=None)  # None: 4 * hidden_size
    lstm_expose_cell_state: bool = False
    layer_norm_eps: float | int = validated_field(POSITIVE_FINITE, default=1e-5)
    initializer_range: float | int = validated_field(POSITIVE_FINITE, default=0.02)
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if "feedback_type" in kwargs:
            self.gradient_mode = fold_feedback_type({"gradient_mode": self.gradient_mode,
                                                     "feedback_type": kwargs.pop("feedback_type")})["gradient_mode"]
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for note in settings_without_effect(self):
            logger.warning(note)
        super().__post_init__(**kwargs)

    def validate_cell_state(self):
        if self.lstm_expose_cell_state and CELLS[self.cell_type].state_vectors == 1:
            raise ValueError(f"`lstm_expose_cell_state=True` needs a cell whose state holds more than `h` "
                             f"(cell_type='lstm'), got cell_type={self.cell_type!r}.")

    def __setattr__(self, key, value):
        if key == "feedback_type":
            raise AttributeError("`feedback_type` is no setting any more: the calibrated feedback is "
                                 "`gradient_mode='dsf_calibrated'`, the paper's fixed one `gradient_mode='dsf'`.")
        super().__setattr__(key, value)

    @property
    def layer_types(self):
        # What transformers' cache code expects of an all-recurrent model.
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def state_multiplier(self):
        """Number of `d`-wide vectors in one layer's state: 2 for the LSTM (`[h, c]`), else 1."""
        return CELLS[self.cell_type].state_vectors


__all__ = ["SfrnnConfig", "CELL_TYPES", "GRADIENT_MODES", "BLOCK_TYPES", "DSF_BACKENDS", "settings_without_effect",
           "fold_feedback_type", "in_range"]
