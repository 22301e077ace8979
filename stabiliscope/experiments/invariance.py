"""Scale invariance of the attention projections, measured on a model at initialization.

QKV-Norm normalizes each head's q, k and v over `d_head`, so multiplying the
rows of W_Q, W_K or W_V that feed one head by `c > 0` leaves the loss
unchanged. HybridNorm (Zhuo et al. 2025) uses QKV-Norm and credits it with a
better gradient flow. Three consequences of the invariance follow by the
chain rule, and this module measures each one on real batches:

- the gradient of the head's rows is orthogonal to those rows, because
  `<dL/dW, W> = dL/dc` at `c = 1`, which is 0;
- the gradient scales like `1/c`, so its log-log exponent against `c` is -1;
- the gradient of W_Q does not change when W_K or W_V is scaled.

Pre-Norm has none of these properties, which makes it the control.

A head's rows are the row block `h * d_head : (h + 1) * d_head` of the
`(width, width)` projection weight, because `q = x W_Q^T` is split into heads
along its output features (see `CausalSelfAttention.split_heads`). Every head of
every block is measured. The norms' `eps` keeps the invariance from being
exact, and with RMSNorm (eps 1e-6) the deviations are about `eps / mean(q^2)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from stabiliscope.models import TransformerLM

ROLES = ("q", "k", "v")

INVARIANCE_METRICS = (
    "invariance/loss_change.q",
    "invariance/loss_change.k",
    "invariance/loss_change.v",
    "invariance/cosine.q",
    "invariance/cosine.k",
    "invariance/cosine.v",
    "invariance/grad_exponent.q",
    "invariance/grad_exponent.k",
    "invariance/grad_exponent.v",
    "invariance/q_grad_change.k",
    "invariance/q_grad_change.v",
)
"""Measured values, each over every head of every block.

- `loss_change.<role>`: max of `|L(c) - L(1)| / L(1)` when one head's rows are scaled by `c`.
- `cosine.<role>`: max of `|cos(grad, W)|` over the heads' row blocks.
- `grad_exponent.<role>`: mean of `log(|grad(c)| / |grad(1)|) / log(c)`; -1 means the
  gradient scales like `1/c`.
- `q_grad_change.<role>`: max of `|grad_Q(c) - grad_Q(1)| / |grad_Q(1)|` over the
  head's rows of W_Q, when that head's rows of W_K or W_V are scaled by `c`.
"""

DEFAULT_WEIGHT_SCALE = 4.0


def measure_invariance(
    model: TransformerLM, inputs: torch.Tensor, targets: torch.Tensor, weight_scale: float
) -> dict[str, float]:
    """Scale each head's rows of W_Q, W_K and W_V by `weight_scale` in turn; return `INVARIANCE_METRICS`.

    Every scaled weight is restored to its original values before the next
    one is scaled, so the model is unchanged on return. Raises ValueError for
    a `weight_scale` that is not positive or equals 1, which would make the
    exponent undefined.
    """
    if not (math.isfinite(weight_scale) and weight_scale > 0 and weight_scale != 1):
        raise ValueError(f"weight_scale must be a positive number other than 1, got {weight_scale!r}")

    base_loss, base_grads = _loss_and_grads(model, inputs, targets)
    log_scale = math.log(weight_scale)
    loss_changes: dict[str, list[float]] = {role: [] for role in ROLES}
    cosines: dict[str, list[float]] = {role: [] for role in ROLES}
    exponents: dict[str, list[float]] = {role: [] for role in ROLES}
    q_changes: dict[str, list[float]] = {"k": [], "v": []}

    for block_index, block in enumerate(model.blocks):
        head_dim = block.attn.head_dim
        for head in range(block.attn.heads):
            rows = slice(head * head_dim, (head + 1) * head_dim)
            base_q_grad = base_grads[block_index]["q"][rows]
            for role in ROLES:
                weight = getattr(block.attn, role).weight
                base_grad = base_grads[block_index][role][rows]
                cosines[role].append(abs(_cosine(base_grad, weight.detach()[rows])))

                with _scaled_rows(weight, rows, weight_scale):
                    loss, grads = _loss_and_grads(model, inputs, targets)
                loss_changes[role].append(abs(loss - base_loss) / abs(base_loss))
                scaled_norm = float(grads[block_index][role][rows].norm())
                exponents[role].append(math.log(scaled_norm / float(base_grad.norm())) / log_scale)
                if role in q_changes:
                    q_change = grads[block_index]["q"][rows] - base_q_grad
                    q_changes[role].append(float(q_change.norm() / base_q_grad.norm()))

    values: dict[str, float] = {}
    for role in ROLES:
        values[f"invariance/loss_change.{role}"] = max(loss_changes[role])
        values[f"invariance/cosine.{role}"] = max(cosines[role])
        values[f"invariance/grad_exponent.{role}"] = sum(exponents[role]) / len(exponents[role])
    for role, changes in q_changes.items():
        values[f"invariance/q_grad_change.{role}"] = max(changes)
    return values


def _loss_and_grads(
    model: TransformerLM, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, list[dict[str, torch.Tensor]]]:
    # Gradients of the attention projections only, one dict per block. The
    # parameters' .grad fields are left untouched.
    weights = [getattr(block.attn, role).weight for block in model.blocks for role in ROLES]
    _, loss = model(inputs, targets)
    grads = torch.autograd.grad(loss, weights)
    per_block = [
        {role: grads[index * len(ROLES) + offset] for offset, role in enumerate(ROLES)}
        for index in range(len(model.blocks))
    ]
    return float(loss.detach()), per_block


@contextmanager
def _scaled_rows(weight: torch.Tensor, rows: slice, factor: float) -> Iterator[None]:
    original = weight.detach()[rows].clone()
    with torch.no_grad():
        weight[rows] *= factor
    try:
        yield
    finally:
        with torch.no_grad():
            weight[rows] = original


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = float(a.norm() * b.norm())
    if denominator == 0:
        return math.nan
    return float((a * b).sum()) / denominator
