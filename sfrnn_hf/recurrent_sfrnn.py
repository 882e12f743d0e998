"""The recurrent layer and its gradient modes.

`SfrnnRecurrentLayer` owns one cell's weights (the layout of `torch.nn.GRU` / `nn.LSTM` / `nn.RNN`; the cell itself is
`cells_sfrnn.CELLS[config.cell_type]`) and the fixed feedback diagonal, and runs the sequence in the mode
`config.gradient_mode` names:

- `bptt`: the recurrence with autograd through torch's fused kernels (cuDNN / oneDNN): exact gradients.
- `dsf` / `ft_bptt` / `diag_jacobian`: the DSF rule with a `Feedback` (a constant diagonal, none, or each step's own
  diag(J_t)). Its definition is `dsf_states`, the reference op: the recurrence without a graph, one batched
  one-step evaluation of the cell with the previous states held constant, and the state gradient rewritten by the
  reverse scan (`DiagonalStateFeedback`). The fast ops take and return the same things (`fused_sfrnn`, `triton_sfrnn`);
  `resolve_dsf_backend` picks one per layer and device, once.
- `feedback_type="calibrated"` (with `dsf`): the diagonal is re-estimated once per optimizer step from the model's own
  diag(J_t) (mean over all the step's micro-batches, processes and real steps, smoothed by `feedback_momentum`,
  clamped to [0, 1]). Each training forward only records the statistics the op returns; `update_calibrated_feedback`
  moves the feedback, called after the optimizer step (`CalibratedFeedbackCallback` does it in the Trainer). A
  recomputed forward (gradient checkpointing) records the same sum again with the same count: the mean is unchanged.
- no gradient needed (eval, generation): the recurrence alone, through the fastest correct path.

Hub-exported file: imports only torch, transformers and its flat siblings.
"""

import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.utils import logging

from .cells_sfrnn import cell_step, default_step_matmul, get_cell
from .configuration_sfrnn import DSF_BACKENDS, calibration_without_effect
from .fused_sfrnn import DSF_CHUNK, chunk_diagonal_jacobian, fused_dsf_recurrence, gates_from_states, \
    jacobian_statistics, recurrence_saving_gates
from .scan_sfrnn import Feedback, JacobianStatistics, reverse_scan_
from .triton_sfrnn import TRITON_AVAILABLE, triton_dsf_pointwise_backward

logger = logging.get_logger(__name__)


def is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of `mask` `(batch, time)` is ones followed by zeros (padding only at the end).

    Reads the mask's values (a host sync on an accelerator), except for one column: right-padded by construction.
    Under `torch.compile` the values cannot be read: False (not known), so the caller takes a path correct for any
    mask."""
    if mask.shape[1] == 1:
        return True
    if torch.compiler.is_compiling():
        return False
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool(torch.equal(mask.bool(), positions[None, :] < lengths))


def effective_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask to apply: None when `mask` `(batch, time)` holds no padding (the fused kernels then run unmasked).
    Telling reads the mask (a host sync on an accelerator), so the mask is kept as given for one column (a decode
    step, where applying it is elementwise anyway) and under `torch.compile` (no data-dependent branch in a graph)."""
    if mask is None or mask.shape[1] == 1 or torch.compiler.is_compiling():
        return mask
    return None if bool(mask.all()) else mask


def _hold_state_after_end(states, initial_state, mask):
    """Right-padded rows: replace the states computed past each row's end by the row's last real state, which is
    what the gated recurrence holds there. states `(batch, time, width)`, initial_state `(batch, width)`."""
    lengths = mask.sum(dim=1)
    last_index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.shape[-1])
    last = states.gather(1, last_index)
    last = torch.where((lengths > 0).view(-1, 1, 1), last, initial_state[:, None, : states.shape[-1]])
    return torch.where(mask.bool().unsqueeze(-1), states, last)


def fused_recurrence(cell, inputs, initial_state, weights):
    """Torch's fused kernel for the whole sequence (autograd through it when enabled: exact BPTT), or None when torch
    has none for the cell.

    inputs `(batch, time, d)`, initial_state `(batch, S)`, weights `(weight_ih, weight_hh, bias_ih, bias_hh)`.
    Returns `h` for every step `(batch, time, d)` and the final state `(batch, S)`.
    """
    if inputs.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast would send the LSTM to oneDNN in bf16, which CPUs without native bf16 cannot run
        # ("unsupported datatype"); the recurrence runs in the weights' dtype, the layers around it stay autocast.
        with torch.autocast("cpu", enabled=False):
            dtype = weights[0].dtype
            return fused_recurrence(cell, inputs.to(dtype), initial_state.to(dtype), weights)
    # cuDNN keeps its workspace for the backward only when told so.
    return get_cell(cell).fused_sequence(inputs, initial_state, list(weights), train=torch.is_grad_enabled())


def looped_recurrence(cell, input_projection, initial_state, weight_hh, bias_hh, mask=None):
    """The gated recurrence as a loop of the cell's step (any mask; every state, `[h, c]` included).

    input_projection `(batch, time, G*d)`, initial_state `(batch, S)`, mask `(batch, time)` or None.
    Returns the states `(batch, time, S)`.
    """
    cell = get_cell(cell)
    state = initial_state
    states = []
    for t in range(input_projection.shape[1]):
        step_mask = None if mask is None else mask[:, t]
        state = cell_step(cell, input_projection[:, t], state, weight_hh, bias_hh, step_mask)
        states.append(state)
    return torch.stack(states, dim=1)


def run_recurrence(cell, inputs, initial_state, weights, mask=None, all_states=False, need_final_state=True):
    """The gated recurrence through the fastest correct path. Differentiable when grad is enabled (exact BPTT).

    Torch's fused kernel whenever the cell has one and padding is only at the end of rows (the states past a row's
    end are then replaced by its last real state); the loop of the cell's step otherwise.

    Args:
        cell: a `Cell` or its name. inputs: `(batch, time, d)`; initial_state: `(batch, S)`; mask: `(batch, time)`
            of 0/1 or None.
        all_states: return the whole state `(batch, time, S)` (the LSTM's `[h, c]`) instead of `h` alone.
        need_final_state: whether the final state is read (a cache); if not, a padded LSTM skips computing `c`.
    Returns:
        `(outputs, final_state)`: `(batch, time, d or S)` and `(batch, S)` (None when not needed and not free).
    """
    cell = get_cell(cell)
    mask = effective_mask(mask)
    fused = None
    if mask is None or is_right_padded(mask):
        fused = fused_recurrence(cell, inputs, initial_state, weights)
    if fused is None:
        weight_ih, weight_hh, bias_ih, bias_hh = weights
        states = looped_recurrence(cell, F.linear(inputs, weight_ih, bias_ih), initial_state, weight_hh, bias_hh, mask)
        width = states.shape[-1] if all_states else inputs.shape[-1]
        return states[..., :width], states[:, -1]
    outputs, final_state = fused
    if outputs.shape[-1] != initial_state.shape[-1] and (all_states or (mask is not None and need_final_state)):
        outputs = cell.complete_states(inputs, outputs, initial_state, weights)
    if mask is not None:
        outputs = _hold_state_after_end(outputs, initial_state, mask)
        final_state = outputs[:, -1] if outputs.shape[-1] == initial_state.shape[-1] else None
    width = outputs.shape[-1] if all_states else inputs.shape[-1]
    return outputs[..., :width], final_state


def kernel_states(cell, inputs, initial_state, weights, mask):
    """Every state `(batch, time, S)` from torch's fused kernel (no graph): the fused op's `state_kernel`."""
    return run_recurrence(cell, inputs, initial_state, weights, mask, all_states=True)[0]


class DiagonalStateFeedback(torch.autograd.Function):
    """The DSF rule. Forward: the states of the recurrence, unchanged. Backward: the incoming state gradient `e`
    rewritten by the reverse scan `g_t = e_t + a_{t+1} * g_{t+1}` and sent into the one-step evaluation.
    `decay`: `(S,)` a constant diagonal, `(batch, time, S)` one per step, or None (no scan: `g = e`)."""

    @staticmethod
    def forward(ctx, states, one_step_states, decay):
        ctx.decay = decay
        return states.view_as(states)

    @staticmethod
    def backward(ctx, grad_states):
        if ctx.decay is None:
            return None, grad_states, None
        grad = grad_states.transpose(0, 1).contiguous()  # time-major, scanned in place
        reverse_scan_(grad, ctx.decay if ctx.decay.dim() == 1 else ctx.decay.transpose(0, 1))
        return None, grad.transpose(0, 1), None


def step_jacobian_diagonals(cell, inputs, previous_states, states, weights, mask):
    """diag(J_t) of every step `(batch, time, S)`, 1 where `mask` holds the state: the gates recomputed batched from
    the states (`gates_from_states`), then the cell's `diagonal_jacobian`, as the fused op computes it per chunk.
    inputs `(batch, time, d)`, previous_states / states `(batch, time, S)`, mask `(batch, time)` or None."""
    inputs_tm, states_tm = inputs.transpose(0, 1).contiguous(), states.transpose(0, 1).contiguous()
    previous_tm = previous_states.transpose(0, 1)
    gates = gates_from_states(cell, inputs_tm, previous_states[:, 0], states_tm, weights)
    mask_tm = None if mask is None else mask.transpose(0, 1).unsqueeze(-1).bool()
    decay = chunk_diagonal_jacobian(cell, gates, previous_tm, states_tm, weights[1], mask_tm, 0, states.shape[1])
    return decay.transpose(0, 1)


def dsf_states(cell, inputs, initial_state, weights, mask, feedback):
    """The reference DSF op: states `(batch, time, S)` whose values are the recurrence's and whose backward is DSF,
    and the forward's `JacobianStatistics` (None unless `feedback.record_statistics`).

    (1) the recurrence without a graph; (2) one batched evaluation of the cell over all positions with the previous
    states held constant (the one-step gradients); (3) the state gradient rewritten by `DiagonalStateFeedback`.
    cell: a `Cell` or its name; inputs `(batch, time, d)`; initial_state `(batch, S)`; weights
    `(weight_ih, weight_hh, bias_ih, bias_hh)`; mask `(batch, time)` or None; feedback a `Feedback`.
    """
    cell = get_cell(cell)
    weight_ih, weight_hh, bias_ih, bias_hh = weights
    with torch.no_grad():
        states, _ = run_recurrence(cell, inputs, initial_state, weights, mask, all_states=True)
    previous_states = torch.cat([initial_state.detach().unsqueeze(1), states[:, :-1]], dim=1)
    decay, statistics = feedback.diagonal, None
    if feedback.per_step or feedback.record_statistics:
        with torch.no_grad():
            jacobians = step_jacobian_diagonals(cell, inputs, previous_states, states,
                                                tuple(w.detach() for w in weights), mask)
        if feedback.per_step:
            decay = jacobians
        if feedback.record_statistics:
            real = torch.ones_like(states[..., 0]) if mask is None else mask.to(states.dtype)
            statistics = JacobianStatistics((jacobians * real.unsqueeze(-1)).sum(dim=(0, 1)), real.sum())
    one_step_states = cell_step(cell, F.linear(inputs, weight_ih, bias_ih), previous_states, weight_hh, bias_hh, mask)
    return DiagonalStateFeedback.apply(states, one_step_states, decay), statistics


# ---------------------------------------------------------------------------------------------------------------------
# Backends: every one takes `(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype)` and returns
# `(states, statistics)`. `resolve_dsf_backend` picks one per layer and device, from `config.dsf_backend`.

class DsfBackend(NamedTuple):
    """A resolved DSF op: `name` (one of `DSF_BACKENDS` but "auto"), the op, and whether torch.compile can trace it."""

    name: str
    op: Callable
    traceable: bool


def _reference_op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=None):
    return dsf_states(cell, inputs, initial_state, weights, mask, feedback)


# The fused op does not trace (Python loops over time writing into preallocated buffers); under torch.compile it runs
# outside the graph, a graph break that `fullgraph=True` refuses.
_fused_outside_graph = torch.compiler.disable(fused_dsf_recurrence)


def _fused_op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=None, **options):
    op = _fused_outside_graph if torch.compiler.is_compiling() else fused_dsf_recurrence
    return op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype=matmul_dtype, **options)


def resolve_dsf_backend(requested: str, device: torch.device) -> DsfBackend:
    """The DSF op for `config.dsf_backend` on `device`. "auto": the measured fastest: on CPU `fused` (the loop
    forward saving the gates, the chunked torch backward); on CUDA `triton` (cuDNN forward, gates recomputed
    batched, scan and pointwise derivative in one Triton kernel) when Triton is installed, else `fused_kernel` (the
    same without Triton); elsewhere (mps, xpu: not measured) `reference`."""
    if requested not in DSF_BACKENDS:
        raise ValueError(f"Unknown dsf_backend {requested!r}; expected one of {list(DSF_BACKENDS)}.")
    name = requested
    if name == "auto":
        name = {"cpu": "fused", "cuda": "triton" if TRITON_AVAILABLE else "fused_kernel"}.get(device.type, "reference")
    if name == "triton" and not TRITON_AVAILABLE:
        raise ValueError("dsf_backend='triton' needs Triton installed (pip install triton); use 'fused_kernel'.")
    # GPU: the backward in long chunks (large matmuls); CPU: short, cache-sized chunks.
    chunk = 1024 if device.type == "cuda" else DSF_CHUNK
    ops = {
        "reference": _reference_op,
        "fused": functools.partial(_fused_op, chunk=chunk),
        "fused_kernel": functools.partial(_fused_op, chunk=chunk, state_kernel=kernel_states),
        "triton": functools.partial(_fused_op, chunk=chunk, state_kernel=kernel_states,
                                    pointwise_kernel=triton_dsf_pointwise_backward),
    }
    return DsfBackend(name, ops[name], traceable=name == "reference")


def _bf16_matmul_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16 / AMX through oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def dsf_layer_states(cell, inputs, initial_state, weights, mask, feedback, backend: DsfBackend):
    """States `(batch, time, S)` with the recurrence's values and the DSF backward, and the forward's
    `JacobianStatistics` (None unless the feedback records them), through `backend`. Shapes as `dsf_states`.

    Under torch.compile a feedback the reference traces (constant or none, no statistics) runs the reference op inside
    the graph; the others run the backend outside it.

    Precision: states, scans and gradient accumulators are in the weights' dtype promoted to at least fp32 (fp64 stays
    fp64). Under `torch.autocast(dtype=torch.bfloat16)` the large matmuls (input projection, weight and input
    gradients) take bf16 operands where the device runs them natively, the output is fp32; without autocast the output
    has the inputs' dtype.
    """
    device = inputs.device
    if torch.compiler.is_compiling() and not (feedback.per_step or feedback.record_statistics):
        backend = resolve_dsf_backend("reference", device)
    autocast = torch.is_autocast_enabled(device.type)
    compute_dtype = torch.promote_types(weights[0].dtype, torch.float32)
    matmul_dtype = None
    if autocast and torch.get_autocast_dtype(device.type) == torch.bfloat16 and _bf16_matmul_supported(device):
        matmul_dtype = torch.bfloat16
    out_dtype = compute_dtype if autocast else inputs.dtype
    inputs, initial_state = inputs.to(compute_dtype), initial_state.to(compute_dtype)
    weights = tuple(w.to(compute_dtype) for w in weights)
    if feedback.diagonal is not None:
        feedback = Feedback.constant(feedback.diagonal.to(compute_dtype), feedback.record_statistics)
    with torch.autocast(device.type, enabled=False):
        states, statistics = backend.op(cell, inputs, initial_state, weights, mask, feedback, matmul_dtype)
    return states.to(out_dtype), statistics


_logged_backends = set()
_PENDING_FORWARDS_WARNING = 256
_optimizer_steps = 0  # every `torch.optim.Optimizer.step()` of this process


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)
_STEP_WITHOUT_CALIBRATION = (
    "An optimizer step passed without moving the calibrated feedback (`feedback_type='calibrated'`): its diag(J) "
    "statistics pile up and the feedback never changes. With a Trainer add "
    "`callbacks=[model.calibrated_feedback_callback()]`; in a hand-written loop call "
    "`model.update_calibrated_feedback()` after each `optimizer.step()`.")


@torch.no_grad()
def mean_diagonal_jacobian(layer, hidden_states, initial_state=None, mask=None) -> torch.Tensor:
    """The mean over the batch's real positions of `layer`'s diag(J_t) per state entry `(S,)`, on its inputs
    hidden_states `(batch, time, d)` (initial_state `(batch, S)` or zeros, mask `(batch, time)` or None). A pure
    function: nothing of the layer changes (what a calibrated feedback with momentum 0 would hold, before clamping)."""
    weights = tuple(w.detach() for w in (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh))
    dtype = torch.promote_types(weights[0].dtype, torch.float32)
    inputs_tm = hidden_states.detach().to(dtype).transpose(0, 1).contiguous()
    batch = inputs_tm.shape[1]
    if initial_state is None:
        initial_state = inputs_tm.new_zeros(batch, layer.state_size)
    initial_state = initial_state.detach().to(dtype)
    mask_tm = None if mask is None else mask.transpose(0, 1).unsqueeze(-1).bool()
    weights = tuple(w.to(dtype) for w in weights)
    _, _, (total, count) = recurrence_saving_gates(layer.cell, inputs_tm, initial_state, weights, mask_tm,
                                                   statistics=True)
    return total / count.to(total).clamp(min=1)


def linspace_feedback(config):
    """The paper's fixed feedback: `linspace(feedback_min, feedback_max, S)` over a layer's state entries."""
    width = config.hidden_size * get_cell(config.cell_type).state_vectors
    return torch.linspace(config.feedback_min, config.feedback_max, width)


class SfrnnRecurrentLayer(nn.Module):
    """One recurrent layer: `(batch, time, d)` -> `(batch, time, d)` (`2d` for an LSTM exposing `[h, c]`).

    Parameters have the shapes and gate order of `nn.GRU` / `nn.LSTM` / `nn.RNN` (without the `_l0` suffix):
    `weight_ih (G*d, d)`, `weight_hh (G*d, d)`, `bias_ih (G*d,)`, `bias_hh (G*d,)`, G = 3 / 4 / 1.
    The buffer `feedback` `(S,)` is the fixed DSF diagonal (saved with the checkpoint, never trained).
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config  # `gradient_mode` is read at every forward, so it can be switched on a live model
        self.layer_idx = layer_idx
        self.cell = get_cell(config.cell_type)
        self.cell_type = self.cell.name
        self.hidden_size = d = config.hidden_size
        self.state_size = d * self.cell.state_vectors
        self.output_size = self.state_size if config.lstm_expose_cell_state else d
        self.weight_ih = nn.Parameter(torch.empty(self.cell.gates * d, d))
        self.weight_hh = nn.Parameter(torch.empty(self.cell.recurrent_gates * d, d))
        self.bias_ih = nn.Parameter(torch.empty(self.cell.gates * d))
        self.bias_hh = nn.Parameter(torch.empty(self.cell.recurrent_gates * d))
        self._backends = {}  # (config.dsf_backend, device type) -> DsfBackend
        self.register_buffer("feedback", torch.empty(self.state_size), persistent=True)
        self.pending_calibration = None  # [diag(J) total (S,), count, forwards] since the last feedback update
        self.calibration_since_step = 0  # the optimizer step count when the pending statistics began

    def record_calibration(self, total: torch.Tensor, count: torch.Tensor) -> None:
        """Add one training forward's diag(J) statistics (`total` `(S,)` summed over `count` real positions) to the
        ones waiting for the next `update_calibrated_feedback`. Detached: no graph, no effect on this step."""
        total, count = total.detach().to(self.feedback.dtype), count.detach().to(self.feedback.dtype)
        if self.pending_calibration is None:
            self.pending_calibration = [total, count, 1]
            self.calibration_since_step = _optimizer_steps
        else:
            if _optimizer_steps != self.calibration_since_step:  # statistics from before a step stayed unapplied
                logger.warning_once(_STEP_WITHOUT_CALIBRATION)
            self.pending_calibration[0] = self.pending_calibration[0] + total
            self.pending_calibration[1] = self.pending_calibration[1] + count
            self.pending_calibration[2] += 1
        if self.pending_calibration[2] == _PENDING_FORWARDS_WARNING:
            logger.warning(f"Layer {self.layer_idx}: {_PENDING_FORWARDS_WARNING} training forwards recorded diag(J) "
                           "statistics for the calibrated feedback, which never moved: call "
                           "model.update_calibrated_feedback() after each optimizer step (sfrnn-train's Trainer does; "
                           "a plain Trainer through callbacks=[model.calibrated_feedback_callback()]).")

    @torch.no_grad()
    def update_calibrated_feedback(self) -> bool:
        """`feedback <- clamp(momentum * feedback + (1 - momentum) * total / count, 0, 1)` from the statistics recorded
        since the last update (False, nothing changed, if none). Under torch.distributed every process calls it (a
        collective): the totals and counts are summed over the processes first, so every replica holds the feedback
        one process would compute over the global batch."""
        if self.pending_calibration is None:
            return False
        total, count, _ = self.pending_calibration
        self.pending_calibration = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            packed = torch.cat([total, count.reshape(1)])
            torch.distributed.all_reduce(packed)
            total, count = packed[:-1], packed[-1]
        momentum = self.config.feedback_momentum
        updated = momentum * self.feedback + (1 - momentum) * total / count.clamp(min=1)
        self.feedback.copy_(updated.clamp(0.0, 1.0))
        return True

    def extra_repr(self) -> str:
        config = self.config  # read now: the gradient mode may have been switched on the live model
        feedback = (f"linspace({config.feedback_min}, {config.feedback_max})" if config.feedback_type == "linspace"
                    else f"calibrated (momentum {config.feedback_momentum})")
        return (f"cell_type={self.cell_type}, hidden_size={self.hidden_size}, state_size={self.state_size}, "
                f"output_size={self.output_size}, gradient_mode={config.gradient_mode}, feedback={feedback}")

    def feedback_for(self, gradient_mode: str) -> Feedback:
        """The reverse scan's decay in a DSF-family mode: `dsf` the feedback diagonal (recording diag(J) statistics
        when calibrated), `ft_bptt` none, `diag_jacobian` each step's own diag(J_t)."""
        if gradient_mode == "dsf":
            return Feedback.constant(self.feedback, record_statistics=self.config.feedback_type == "calibrated")
        if gradient_mode == "ft_bptt":
            return Feedback.none()
        if gradient_mode == "diag_jacobian":
            return Feedback.diag_jacobian()
        raise ValueError(f"gradient_mode {gradient_mode!r} has no DSF feedback.")

    def dsf_backend(self, device: torch.device) -> DsfBackend:
        """The DSF op for this layer on `device`, resolved once per `config.dsf_backend` and device type."""
        key = (self.config.dsf_backend, device.type)
        if key not in self._backends:
            backend = self._backends[key] = resolve_dsf_backend(self.config.dsf_backend, device)
            if key not in _logged_backends and not torch.compiler.is_compiling():  # dynamo refuses logger calls
                _logged_backends.add(key)
                step_matmul = ""
                if backend.name == "fused":
                    compute_dtype = torch.promote_types(self.weight_hh.dtype, torch.float32)
                    kind = default_step_matmul(device, compute_dtype)
                    step_matmul = f", per-step matmul {kind} for {compute_dtype}"
                logger.info(f"sfrnn DSF backend: {backend.name} on {device.type} (config.dsf_backend="
                            f"{self.config.dsf_backend!r}){step_matmul}")
        return self._backends[key]

    @property
    def init_bound(self):
        """torch's RNN init: `U(-1/sqrt(d), 1/sqrt(d))`."""
        return 1.0 / math.sqrt(self.hidden_size)

    def forward(self, hidden_states, initial_state=None, mask=None, need_final_state=False):
        """
        Under torch.compile a training forward over more than one step runs outside the graph (see
        `_training_recurrence_outside_graph`).

        Args:
            hidden_states: `(batch, time, d)`.
            initial_state: `(batch, S)` or None (zeros).
            mask: `(batch, time)`, 1 for real tokens; a padded position leaves the state unchanged.
            need_final_state: whether the final state will be read (a cache).
        Returns:
            outputs `(batch, time, output_size)`, final state `(batch, S)` (None unless `need_final_state`).
        """
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and hidden_states.shape[1] > 1:
            return _training_recurrence_outside_graph(self, hidden_states, initial_state, mask, need_final_state)
        batch = hidden_states.shape[0]
        if initial_state is None:
            initial_state = hidden_states.new_zeros(batch, self.state_size)
        # Read once: under a PEFT `target_parameters` LoRA these are the adapted weights.
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or any(w.requires_grad for w in weights))
        mode = self.config.gradient_mode
        if needs_grad and not torch.compiler.is_compiling():
            # The mode may have been switched on the live model since the config was checked.
            note = calibration_without_effect(mode, self.config.feedback_type)
            if note:
                logger.warning_once(note)
        if needs_grad and mode != "bptt":
            feedback = self.feedback_for(mode)
            states, statistics = dsf_layer_states(self.cell, hidden_states, initial_state, weights, mask, feedback,
                                                  self.dsf_backend(hidden_states.device))
            if statistics is not None:
                self.record_calibration(*statistics)
            outputs, final_state = states[..., : self.output_size], states[:, -1]
        else:
            all_states = self.output_size == self.state_size
            outputs, final_state = run_recurrence(self.cell, hidden_states, initial_state, weights, mask,
                                                  all_states, need_final_state)
        # The same outputs whether or not grad is enabled: reentrant checkpointing recomputes a no-grad forward.
        return outputs, final_state if need_final_state else None


# A traced training recurrence is a Python loop over time unrolled into the graph and its backward: compiling costs
# minutes and is redone for every new sequence length (a Trainer's padded batches: one per step, until dynamo's
# recompile limit). Run eagerly instead (the fused op or torch's kernel): the rest of the model still compiles, and
# `fullgraph=True` refuses the graph break.
_training_recurrence_outside_graph = torch.compiler.disable(SfrnnRecurrentLayer.forward)


__all__ = ["SfrnnRecurrentLayer", "mean_diagonal_jacobian", "dsf_states", "dsf_layer_states", "resolve_dsf_backend",
           "DsfBackend", "DSF_BACKENDS", "run_recurrence", "linspace_feedback", "DiagonalStateFeedback"]
