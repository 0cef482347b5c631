"""The search on Ray Tune: the only package (with `jobs.py`) that imports Ray.

| module        | its one job                                                            |
|---------------|------------------------------------------------------------------------|
| `run`         | `run_search`: the steps of a search, the Tuner, the run lock           |
| `trainable`   | what runs in a Ray worker for one trial (calls `train.train`)          |
| `searcher`    | Ray's OptunaSearch, telling Optuna how each trial ended (PRUNED, …)    |
| `callbacks`   | progress lines, failure budget, TensorBoard, uploads of run files      |
| `metrics`     | the search's own series in Ray's metrics (Prometheus, Grafana)         |
| `schedulers`  | ASHA with persistent rungs; snapshots when trials start or end         |
| `cluster`     | start or join Ray, cluster resources, the shared-storage probe         |
| `storage`     | s3:// / gs:// run locations: upload, download, checkpoints             |
| `records`     | Ray's results as plain `TrialRecord` s                                  |
| `ray_private` | every use of Ray's private state, with the Ray version it was checked on |

Import the modules (`from raytune_ft.search.run import run_search`): this package exports
nothing of its own, so `import raytune_ft.search.ray_private` (jobs.py) imports Ray's
private modules only, and reading this docstring imports neither Ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Run folders written by rtft 0.1.0 (when this was one module, search.py) hold a pickled Tuner
# that names these classes: `Tuner.restore` finds them here.
_PICKLED_BEFORE_0_2 = {
    "_PersistentASHA": ("schedulers", "PersistentASHA"), "_FIFO": ("schedulers", "FIFO"),
    "_Progress": ("callbacks", "Progress"), "_FailureBudget": ("callbacks", "FailureBudget"),
    "_TensorBoard": ("callbacks", "TensorBoard"),
    "_UploadRunFiles": ("callbacks", "UploadRunFiles"), "_trainable": ("trainable", "run_trial"),
}


def __getattr__(name: str) -> Any:
    if name in _PICKLED_BEFORE_0_2:
        module, new = _PICKLED_BEFORE_0_2[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
