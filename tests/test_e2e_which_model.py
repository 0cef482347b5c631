"""Which model to fine-tune: a tiny `model.arch` choice search end to end through `rtft search`
and a real embedded Ray (two families, a `when: {arch: …}` knob, real training on tiny
digits), then the cost it recorded, the promotion bound, `rtft promote --pareto`, the results
table and the report's accuracy/latency plot, all read back from the run folder.

The two networks take different input sizes, as they do with ImageNet weights: resnet18
without weights trains on the digits' natural 32 px, mobilenet_v3_small with torchvision's
IMAGENET1K_V1 at that weights' 224 px crop. Offline, those weights are a stand-in file put in
the tests' private torch hub cache (conftest sets TORCH_HOME): torchvision loads it from there
as it would the downloaded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from raytune_ft.cli.main import main
from raytune_ft.promote import load_promoted
from raytune_ft.runs import COST_KEYS, read_records
from raytune_ft.selection import model_costs, pareto_front
from raytune_ft.spec.yaml_io import load_spec

pytestmark = pytest.mark.slow

ARCHS = ("resnet18", "mobilenet_v3_small")
# Between the two: resnet18 with a 10-class head has 11.2 M parameters, mobilenet_v3_small 1.5 M.
MAX_PARAMS = 5_000_000

SPEC = """\
name: which
model:
  arch: {{space: choice, values: [resnet18, mobilenet_v3_small]}}
  weights: {{resnet18: none, mobilenet_v3_small: IMAGENET1K_V1}}
data: {{source: digits, train_limit: 120, val_fraction: 0.15, test_fraction: 0.15}}
train: {{max_epochs: 2, seed: 0}}
search:
  lr: {{space: loguniform, low: 1.0e-3, high: 1.0e-2}}
  head_dropout: {{space: uniform, low: 0.0, high: 0.3, when: {{arch: [mobilenet_v3_small]}}}}
  freeze_fraction: {{space: uniform, low: 0.0, high: 0.5}}
  batch_size: 32
  augment: none
searcher: {{sampler: random, seed: 1, baseline_first: false}}
scheduler: {{type: none}}
run: {{num_samples: 4, max_concurrent_trials: 2, storage_path: {root}/runs}}
promote: {{dir: {root}/models, max_params: {max_params}}}
"""


def _stand_in_imagenet_weights() -> None:
    """A mobilenet_v3_small state dict where torchvision's hub cache keeps IMAGENET1K_V1."""
    import torch
    from torchvision.models import get_model_weights, mobilenet_v3_small

    url = get_model_weights("mobilenet_v3_small").IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(mobilenet_v3_small(weights=None).state_dict(), path)


@pytest.fixture(scope="module")
def which_run(ray_session, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    _stand_in_imagenet_weights()
    root = tmp_path_factory.mktemp("which")
    spec_file = root / "which.yaml"
    spec_file.write_text(SPEC.format(root=root, max_params=MAX_PARAMS))
    result = CliRunner().invoke(main, ["search", str(spec_file)], catch_exceptions=False)
    return root, result


def test_each_trial_trains_its_architecture_and_records_its_cost(which_run) -> None:  # noqa: ANN001
    root, result = which_run
    assert result.exit_code == 0, result.output
    trials = json.loads((root / "runs" / "which" / "trials.json").read_text())
    assert len(trials) == 4
    assert {t["params"]["arch"] for t in trials} == set(ARCHS)  # seed 1 draws both
    params_by_arch: dict[str, set[int]] = {}
    for t in trials:
        arch = t["params"]["arch"]
        # the `when: {arch: [mobilenet_v3_small]}` knob is sampled for that arch only
        assert ("head_dropout" in t["params"]) == (arch == "mobilenet_v3_small")
        assert set(COST_KEYS) <= set(t["cost"]), t["cost"]
        assert all(t["cost"][k] > 0 for k in COST_KEYS)
        assert all(set(COST_KEYS) <= set(h) for h in t["history"])
        params_by_arch.setdefault(arch, set()).add(int(t["cost"]["params"]))
    # the parameters counted are the trial's own network's: one count per arch, far apart
    assert all(len(v) == 1 for v in params_by_arch.values())
    (big,), (small,) = params_by_arch["resnet18"], params_by_arch["mobilenet_v3_small"]
    assert small < MAX_PARAMS < big
    # each input size read once, recorded with its own fingerprint
    data = json.loads((root / "runs" / "which" / "data.json").read_text())
    assert set(data["by_image_size"]) == {"32", "224"}
    assert data["by_image_size"]["32"]["sha256"] != data["by_image_size"]["224"]["sha256"]


def test_promotion_honours_the_parameter_bound(which_run) -> None:  # noqa: ANN001
    root, result = which_run
    assert "promoted model:" in result.output, result.output
    folder = root / "models" / "which" / "v1"
    spec = load_spec(folder / "spec.yaml")
    # the model folder holds the plain single-arch spec of the trial it came from
    assert spec.model.arch == "mobilenet_v3_small" and not spec.arch_searched
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["cost"]["params"] <= MAX_PARAMS
    loaded = load_promoted(folder)
    assert sum(p.numel() for p in loaded.model.parameters()) == metrics["cost"]["params"]
    # promoted at its own input size and normalisation (the weights' metadata), tested there
    assert spec.data.image_size == 224 and loaded.config["mean"] == [0.485, 0.456, 0.406]
    assert metrics["test"]["n"] > 0


def test_a_trial_at_the_other_input_size_reproduces(which_run) -> None:  # noqa: ANN001
    root, _ = which_run
    run_dir = root / "runs" / "which"
    trials = json.loads((run_dir / "trials.json").read_text())
    mobile = next(t for t in trials if t["params"]["arch"] == "mobilenet_v3_small")
    res = CliRunner().invoke(main, ["reproduce", str(run_dir), mobile["trial_id"]],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "data matches" in res.output


def test_promote_pareto_promotes_the_front_one_version_each(which_run) -> None:  # noqa: ANN001
    root, _ = which_run
    run_dir = root / "runs" / "which"
    spec = load_spec(run_dir / "spec.yaml")
    records = read_records(run_dir / "trials.json")
    eligible = [r for r in records if r.cost.get("params", 0) <= MAX_PARAMS]
    # latency per model over the whole run (runs.model_costs), the front among those that fit
    front = pareto_front(eligible, spec.metric, spec.mode, costs=model_costs(records))
    assert front
    before = {p.name for p in (root / "models" / "which").iterdir() if p.name.startswith("v")}
    res = CliRunner().invoke(main, ["promote", str(run_dir), "--pareto"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    after = {p.name for p in (root / "models" / "which").iterdir() if p.name.startswith("v")}
    new = sorted(after - before, key=lambda v: int(v[1:]))
    assert len(new) == len(front)
    got = [json.loads((root / "models" / "which" / v / "metrics.json").read_text())["trial_id"]
           for v in new]
    assert got == [r.trial_id for r in front]


def test_results_and_report_show_arch_and_cost(which_run) -> None:  # noqa: ANN001
    root, _ = which_run
    run_dir = root / "runs" / "which"
    res = CliRunner().invoke(main, ["results", str(run_dir)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "arch" in res.output and "mobilenet_v3_small" in res.output
    rep = CliRunner().invoke(main, ["report", str(run_dir)], catch_exceptions=False)
    assert rep.exit_code == 0, rep.output
    html = next(Path(run_dir).rglob("report*.html")).read_text()
    assert "resnet18" in html and "mobilenet_v3_small" in html
    assert list(Path(run_dir).rglob("cost.png"))
