"""The reverse diagonal scan of DSF, `g_t = e_t + a_{t+1} * g_{t+1}`, and the typed feedback that sets its decay.

With a constant diagonal `a` (the paper's DSF) the scan is an anti-causal, exponentially discounted sum of future
errors, `g_t = sum_{k >= t} a^(k - t) * e_k`: elementwise over the state, O(S) per step, never a d x d matmul.
`reverse_scan_` is the torch form, written once and used by every torch path; the Triton backward fuses its own.

Hub-exported file: imports only torch.
"""

from typing import Callable, NamedTuple

import torch

class Feedback:
    """How DSF's reverse scan decays the state gradient: one subclass per feedback type, selected by the
    `config.gradient_mode` it names (`gradient_mode`, registered in `FEEDBACKS`). What the engine asks of it:

    - `scan_(grad, step_jacobians, carry)`: the reverse scan over a chunk, its decay chosen by the feedback;
    - `to(dtype)`: the feedback in the compute dtype;
    - `record_statistics`: whether the forward returns diag(J_t) statistics (`JacobianStatistics`);
    - `per_step`: whether the decay is each step's diag(J_t) (the forward's gates then feed the scan);
    - `kernel_variant`: the Triton kernel's variant that scans it, one of `KERNEL_VARIANTS` ("constant": the
      `diagonal` `(S,)`, "per_step": diag(J_t) computed in the kernel, "none": no scan), or None when the kernel has
      none (the torch pointwise backward then serves it).
    """

    gradient_mode: str
    diagonal: torch.Tensor | None = None
    record_statistics: bool = False
    per_step: bool = False
    kernel_variant: str | None = None

    @classmethod
    def of_layer(cls, layer) -> "Feedback":
        """The feedback of a recurrent layer (its `feedback` buffer `(S,)` and its `config`) in this mode."""
        return cls()

    def decay(self, steps: int, step_jacobians: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The decay of `steps` steps, `(steps, batch or 1, S)`; `step_jacobians()` gives their diag(J_t)
        `(steps, batch, S)` (computed only if called)."""
        raise NotImplementedError

    def scan_(self, grad: torch.Tensor, step_jacobians: Callable[[], torch.Tensor],
              carry: torch.Tensor | None = None) -> torch.Tensor | None:
        """In place over a chunk `grad` `(steps, batch, S)` time-major: `g_t = e_t + decay_{t+1} g_{t+1}`, started
        from the later chunk's `carry`; returns the carry for the earlier chunk (`reverse_scan_`)."""
        return reverse_scan_(grad, self.decay(grad.shape[0], step_jacobians), carry)

    def to(self, dtype: torch.dtype) -> "Feedback":
        return self

    def __repr__(self):
        return f"{type(self).__name__}()"


class ConstantFeedback(Feedback):
    """`g_t = e_t + a * g_{t+1}` with a fixed diagonal `a` `(S,)`: the paper's DSF."""

    gradient_mode = "dsf"
    kernel_variant = "constant"

    def __init__(self, diagonal: torch.Tensor):
        self.diagonal = diagonal

    @classmethod
    def of_layer(cls, layer):
        return cls(layer.feedback)

    def decay(self, steps, step_jacobians):
        return self.diagonal.expand(steps, 1, -1)

    def to(self, dtype):
        return type(self)(self.diagonal.to(dtype))

    def __repr__(self):
        return f"{type(self).__name__}({tuple(self.diagonal.shape)})"


class CalibratedFeedback(ConstantFeedback):
    """A constant diagonal whose forward also returns diag(J_t) summed over the real positions, from which the
    diagonal is re-estimated once per optimizer step (`SfrnnRecurrentLayer.update_calibrated_feedback`)."""

    gradient_mode = "dsf_calibrated"
    record_statistics = True


class NoFeedback(Feedback):
    """`g_t = e_t`, no scan: fully truncated BPTT."""

    gradient_mode = "ft_bptt"
    kernel_variant = "none"

    def scan_(self, grad, step_jacobians, carry=None):
        return None


class DiagJacobianFeedback(Feedback):
    """Each step decays by its own diagonal Jacobian: `g_t = e_t + diag(J_{t+1}) g_{t+1}`."""

    gradient_mode = "diag_jacobian"
    per_step = True
    kernel_variant = "per_step"

    def decay(self, steps, step_jacobians):
        return step_jacobians()


KERNEL_VARIANTS = ("none", "constant", "per_step")
# `config.gradient_mode` -> the feedback it trains with (every mode but "bptt").
FEEDBACKS = {feedback.gradient_mode: feedback
             for feedback in (ConstantFeedback, CalibratedFeedback, NoFeedback, DiagJacobianFeedback)}


class JacobianStatistics(NamedTuple):
    """A forward's diag(J_t) summed over the batch and the real steps, per state entry `total` `(S,)`, and how many
    positions it sums, `count` (0-dim): what a calibrated feedback averages."""

    total: torch.Tensor
    count: torch.Tensor


def reverse_scan_(grad: torch.Tensor, decay: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
    """In place, `grad[i] += decay[i + 1] * grad[i + 1]` from the last step to the first, time-major.

    Args:
        grad: `(steps, batch, S)` the errors `e`, overwritten by `g` (a chunk of a longer sequence, or all of it).
        decay: `(steps, batch or 1, S)`: `decay[i]` scales `g_i` into `g_{i-1}` (a constant diagonal expanded over
            the steps, or each step's own).
        carry: what the later chunk passes back, `decay_end * g_end` `(batch, S)`, or None after the last step.
    Returns:
        the carry for the earlier chunk, `decay[0] * g_0` `(batch, S)`.
    """
    steps = grad.shape[0]
    if carry is not None:
        grad[steps - 1].add_(carry)
    for i in range(steps - 2, -1, -1):
        grad[i].addcmul_(decay[i + 1], grad[i + 1])
    return grad[0] * decay[0]


def reverse_diagonal_scan(errors: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """`g_t = e_t + feedback * g_{t+1}` over the time axis, accumulated in at least fp32, returned in `errors.dtype`.

    Args:
        errors: `(batch, time, state)`.
        feedback: `(state,)`, values in [0, 1].

    Example:
        >>> e = torch.randn(2, 5, 3); a = torch.tensor([0.0, 0.5, 1.0])
        >>> g = reverse_diagonal_scan(e, a)   # g[:, :, 0] == e[:, :, 0]; g[:, :, 2] == reversed cumsum of e
    """
    dtype = torch.promote_types(errors.dtype, torch.float32)
    grad = errors.transpose(0, 1).to(dtype, copy=True, memory_format=torch.contiguous_format)
    reverse_scan_(grad, feedback.to(device=errors.device, dtype=dtype).expand(grad.shape[0], 1, -1))
    return grad.transpose(0, 1).to(errors.dtype)


__all__ = ["Feedback", "ConstantFeedback", "CalibratedFeedback", "NoFeedback", "DiagJacobianFeedback", "FEEDBACKS",
           "KERNEL_VARIANTS",
           "JacobianStatistics", "reverse_scan_", "reverse_diagonal_scan"]
