"""The recurrent layer and its gradient modes.

`SfrnnRecurrentLayer` owns one cell's weights (the layout of `torch.nn.GRU` / `nn.LSTM` / `nn.RNN`; the cell itself is
`cells_sfrnn.CELLS[config.cell_type]`) and the fixed feedback diagonal, and runs the sequence in the mode
`config.gradient_mode` names:

- `bptt`: the recurrence with autograd through torch's fused kernels (cuDNN / oneDNN): exact gradients.
- `dsf` / `ft_bptt` / `diag_jacobian`: the DSF rule with a `Feedback` (a constant diagonal, none, or each step's own
  diag(J_t)). Its definition is the reference op `reference_sfrnn.dsf_states`; the fast ops take and return the same
  things (`fused_sfrnn`, `triton_sfrnn`); `backends_sfrnn.resolve_dsf_backend` picks one per layer and device, once.
- `dsf_calibrated`: DSF whose diagonal is re-estimated once per optimizer step from the model's own
  diag(J_t) (mean over all the step's micro-batches, processes and real steps, smoothed by `feedback_momentum`,
  clamped to [0, 1]). Each training forward only records the statistics the op returns; `update_calibrated_feedback`
  moves the feedback, called after the optimizer step (`CalibratedFeedbackCallback` does it in the Trainer). A
  recomputed forward (gradient checkpointing) records the same sum again with the same count: the mean is unchanged.
- no gradient needed (eval, generation): the recurrence alone, through the fastest correct path.

Hub-exported file: imports only torch, transformers and its flat siblings.
"""

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.utils import logging

from .backends_sfrnn import DsfBackend, dsf_layer_states, resolve_dsf_backend
from .cells_sfrnn import default_step_matmul, get_cell
from .fused_sfrnn import recurrence_saving_gates
from .recurrence_sfrnn import run_recurrence
from .scan_sfrnn import FEEDBACKS, Feedback

logger = logging.get_logger(__name__)


_logged_backends = set()
_PENDING_FORWARDS_WARNING = 256
_optimizer_steps = 0  # every `torch.optim.Optimizer.step()` of this process


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)
_STEP_WITHOUT_CALIBRATION = (
    "An optimizer step passed without moving the calibrated feedback (`gradient_mode='dsf_calibrated'`): its diag(J) "
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

    Parameters `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh` with the shapes the cell declares
    (`Cell.parameter_shapes`): for GRU / LSTM / RNN those of `nn.GRU` / `nn.LSTM` / `nn.RNN` (without the `_l0` suffix),
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
        for name, shape in self.cell.parameter_shapes(d).items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
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
        feedback = (f"calibrated (momentum {config.feedback_momentum})" if config.gradient_mode == "dsf_calibrated"
                    else f"linspace({config.feedback_min}, {config.feedback_max})")
        return (f"cell_type={self.cell_type}, hidden_size={self.hidden_size}, state_size={self.state_size}, "
                f"output_size={self.output_size}, gradient_mode={config.gradient_mode}, feedback={feedback}")

    def feedback_for(self, gradient_mode: str) -> Feedback:
        """The reverse scan's feedback in a DSF-family mode (`scan_sfrnn.FEEDBACKS`): `dsf` the feedback diagonal,
        `dsf_calibrated` the same recording diag(J) statistics, `ft_bptt` none, `diag_jacobian` each step's own diag(J_t)."""
        if gradient_mode not in FEEDBACKS:
            raise ValueError(f"gradient_mode {gradient_mode!r} has no DSF feedback; expected one of {list(FEEDBACKS)}.")
        return FEEDBACKS[gradient_mode].of_layer(self)

    def dsf_backend(self, device: torch.device) -> DsfBackend:
        """The DSF op for this layer on `device`, resolved once per `config.dsf_backend` and device type."""
        key = (self.config.dsf_backend, device.type)
        if key not in self._backends:
            backend = self._backends[key] = resolve_dsf_backend(self.config.dsf_backend, device, self.cell)
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


__all__ = ["SfrnnRecurrentLayer", "mean_diagonal_jacobian", "linspace_feedback"]
