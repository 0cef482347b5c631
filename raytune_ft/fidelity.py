"""What the searcher is told when a trial ends: the fidelity-aware rule, without Ray.

Ray's `OptunaSearch` tells Optuna every finished trial as COMPLETE with its *last* reported
value, so a trial ASHA stopped after one epoch is ranked against trials that trained to the
end, and the sampler's good/bad split mixes fidelities. rtft tells Optuna what happened:

| how the trial ended                      | Optuna state | value                         |
|------------------------------------------|--------------|-------------------------------|
| trained to `max_t`                       | COMPLETE     | best-so-far of the metric     |
| stopped early (ASHA, end of the search)  | PRUNED       | none: its intermediate values |
| diverged (NaN/inf loss)                  | PRUNED       | none: the worst value, last   |
| failed (an exception), or no result      | FAIL         | none                          |

Every epoch's metric is an intermediate value (step = epoch), so a PRUNED trial carries its
curve. Optuna's TPE ranks PRUNED trials by the epoch they reached, then by their value there;
all COMPLETE trials rank above them. COMPLETE uses the best-so-far value because promotion
ranks trials by it (`runs.ranked`): the searcher and promotion agree on what "good" is.

Diverged: FAIL would hide the trial from TPE, which would go on proposing the region (a
learning rate too high) that made it diverge. The trainer reports a diverged epoch with the
metric's worst value (`train.DIVERGED`: val_acc 0, val_loss 1e9); told PRUNED, the trial ranks
below every trial that reached the same epoch. (TPE ranks PRUNED trials by the epoch reached
first: one that diverged late still ranks above trials stopped at an earlier rung.)

`telling: last` reproduces Ray's rule (COMPLETE with the last value), for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["COMPLETE", "PRUNED", "FAIL"]


@dataclass(frozen=True)
class Told:
    """What Optuna is told about one ended trial."""

    state: State
    value: float | None = None


def finite(x: Any) -> bool:
    """A real, finite number (bools are not metrics)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tell(result: dict[str, Any] | None, *, error: bool, metric: str, max_t: int,
         step_key: str = "training_iteration", telling: str = "fidelity") -> Told:
    """The state and value to tell Optuna for a trial whose last result is `result`."""
    if error or not result or not finite(result.get(step_key)):
        return Told("FAIL")
    if telling == "last":
        value = result.get(metric)
        return Told("COMPLETE", value) if finite(value) else Told("FAIL")
    if result.get("diverged") or not finite(result.get(metric)) or result[step_key] < max_t:
        return Told("PRUNED")
    best = result.get(f"best_{metric}")
    return Told("COMPLETE", best if finite(best) else result[metric])
