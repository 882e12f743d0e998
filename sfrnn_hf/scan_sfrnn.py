"""The reverse diagonal scan of DSF, `g_t = e_t + a_{t+1} * g_{t+1}`, and the typed feedback that sets its decay.

With a constant diagonal `a` (the paper's DSF) the scan is an anti-causal, exponentially discounted sum of future
errors, `g_t = sum_{k >= t} a^(k - t) * e_k`: elementwise over the state, O(S) per step, never a d x d matmul.
`reverse_scan_` is the torch form, written once and used by every torch path; the Triton backward fuses its own.

Hub-exported file: imports only torch.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

FEEDBACK_KINDS = ("constant", "none", "diag_jacobian")


@dataclass(frozen=True)
class Feedback:
    """How DSF's reverse scan decays the state gradient.

    - `Feedback.constant(a)`: `g_t = e_t + a * g_{t+1}` with a fixed diagonal `a` `(S,)` (the paper's DSF);
      `record_statistics=True` (a calibrated feedback) also returns diag(J_t) summed over the real positions, from
      which the diagonal is re-estimated once per optimizer step.
    - `Feedback.none()`: `g_t = e_t`, no scan (FT-BPTT).
    - `Feedback.diag_jacobian()`: each step decays by its own diagonal Jacobian, `g_t = e_t + diag(J_{t+1}) g_{t+1}`.
    """

    kind: str
    diagonal: torch.Tensor | None = None
    record_statistics: bool = False

    def __post_init__(self):
        if self.kind not in FEEDBACK_KINDS:
            raise ValueError(f"Unknown feedback kind {self.kind!r}; expected one of {FEEDBACK_KINDS}.")
        if (self.diagonal is not None) != (self.kind == "constant"):
            raise ValueError(f"A {self.kind!r} feedback {'needs' if self.kind == 'constant' else 'takes no'} diagonal.")

    @classmethod
    def constant(cls, diagonal: torch.Tensor, record_statistics: bool = False) -> "Feedback":
        return cls("constant", diagonal, record_statistics)

    @classmethod
    def none(cls) -> "Feedback":
        return cls("none")

    @classmethod
    def diag_jacobian(cls) -> "Feedback":
        return cls("diag_jacobian")

    @property
    def per_step(self) -> bool:
        """Whether the decay differs per step and row (computed from the forward's gates)."""
        return self.kind == "diag_jacobian"


class JacobianStatistics(NamedTuple):
    """A forward's diag(J_t) summed over the batch and the real steps, per state entry `total` `(S,)`, and how many
    positions it sums, `count` (0-dim): what a calibrated feedback averages."""

    total: torch.Tensor
    count: torch.Tensor


def reverse_scan_(grad: torch.Tensor, decay: torch.Tensor | None, carry: torch.Tensor | None = None) -> torch.Tensor:
    """In place, `grad[i] += decay_{i+1} * grad[i+1]` from the last step to the first, time-major.

    Args:
        grad: `(steps, batch, S)` the errors `e`, overwritten by `g` (a chunk of a longer sequence, or all of it).
        decay: `(S,)` a constant diagonal, `(steps, batch, S)` one per step (`decay[i]` scales `g_i` into
            `g_{i-1}`), or None: no scan.
        carry: what the later chunk passes back, `decay_end * g_end` `(batch, S)`, or None after the last step.
    Returns:
        the carry for the earlier chunk, `decay_0 * g_0` `(batch, S)` (None without decay).
    """
    if decay is None:
        return None
    steps = grad.shape[0]
    constant = decay.dim() == 1
    if carry is not None:
        grad[steps - 1].add_(carry)
    for i in range(steps - 2, -1, -1):
        grad[i].addcmul_(decay if constant else decay[i + 1], grad[i + 1])
    return grad[0] * (decay if constant else decay[0])


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
    reverse_scan_(grad, feedback.to(device=errors.device, dtype=dtype))
    return grad.transpose(0, 1).to(errors.dtype)


def reverse_diagonal_scan_reference(errors: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """The definition as a plain loop, for tests: errors `(batch, time, state)`, feedback `(state,)` ->
    `(batch, time, state)` in at least fp32."""
    errors = errors.to(torch.promote_types(errors.dtype, torch.float32))
    feedback = feedback.to(errors.dtype)
    out = torch.empty_like(errors)
    carry = torch.zeros_like(errors[:, 0])
    for t in reversed(range(errors.shape[1])):
        carry = errors[:, t] + feedback * carry
        out[:, t] = carry
    return out


__all__ = ["Feedback", "JacobianStatistics", "reverse_scan_", "reverse_diagonal_scan", "reverse_diagonal_scan_reference"]
