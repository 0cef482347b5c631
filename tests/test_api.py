"""api.py, the Python API (`raytune_ft.search`, `validate`, `load_spec`, `results`,
`promote`): a spec as a path, YAML text or a dict; results as data read back from real run
folders; bad input as UserError, never SystemExit; searches one after another in one process
(real embedded Ray); the run's Optuna journal as optuna-dashboard opens it; the quick-start
notebook run by a real Jupyter kernel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from helpers import ENV, ROOT, TINY_SPEC, run_instant_driver, write_tiny_spec

import raytune_ft
from raytune_ft.cli.main import main
from raytune_ft.errors import UserError


def _tiny_text(root: Path, n: int = 4, weights: str = "none") -> str:
    return TINY_SPEC.format(root=root, n=n, weights=weights)


# --------------------------------------------------------------------------------------------
# Import, specs, bad input, the dry run: no Ray
# --------------------------------------------------------------------------------------------
def test_import_is_light_and_search_and_promote_stay_the_api_after_their_modules() -> None:
    """`import raytune_ft` and its API names load neither torch, Ray nor pandas; the names
    `search` and `promote`, which are also modules of the package, stay the API's functions
    once those modules are imported, and still reach the modules' attributes."""
    code = """\
import sys, inspect
import raytune_ft as rtft
names = [rtft.search, rtft.promote, rtft.validate, rtft.load_spec, rtft.results,
         rtft.SearchResult, rtft.Validation, rtft.load_promoted]
print(sorted(m for m in ('torch', 'torchvision', 'ray', 'pandas') if m in sys.modules))
import raytune_ft.search.records, raytune_ft.promote
import raytune_ft.search.records as records
from raytune_ft import promote as P
from raytune_ft import search
import raytune_ft.api as api
assert callable(rtft.search) and rtft.search.__wrapped__ is api.search, rtft.search
assert search.__wrapped__ is api.search and rtft.promote.__wrapped__ is api.promote
assert rtft.search.records is records is sys.modules['raytune_ft.search.records']
assert P.load_promoted is sys.modules['raytune_ft.promote'].load_promoted
assert list(inspect.signature(rtft.search).parameters)[:2] == ['spec', 'overrides']
assert 'Run the search' in rtft.search.__doc__
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "ok"], out.stdout


def test_load_spec_takes_a_path_yaml_text_a_dict_and_a_spec(tmp_path: Path) -> None:
    path = write_tiny_spec(tmp_path)
    text = path.read_text()
    sets = ["run.num_samples=3", "search.lr.high=0.005"]
    by_path = raytune_ft.load_spec(path, sets)
    assert by_path.run.num_samples == 3 and by_path.search["lr"].high == 0.005
    assert raytune_ft.load_spec(str(path), sets) == by_path
    assert raytune_ft.load_spec(text, sets) == by_path
    assert raytune_ft.load_spec(yaml.safe_load(text), sets) == by_path
    assert raytune_ft.load_spec(raytune_ft.load_spec(path), sets) == by_path
    assert raytune_ft.load_spec(path, "run.num_samples=3").run.num_samples == 3  # one --set


@pytest.mark.parametrize("kind", ["path", "text", "dict"])
def test_a_bad_spec_raises_user_error_not_system_exit(tmp_path: Path, kind: str) -> None:
    text = _tiny_text(tmp_path).replace("max_epochs: 2", "max_epochs: -2")
    spec: object = {"path": lambda: _write(tmp_path / "bad.yaml", text), "text": lambda: text,
                    "dict": lambda: yaml.safe_load(text)}[kind]()
    for call in (lambda: raytune_ft.load_spec(spec), lambda: raytune_ft.validate(spec),
                 lambda: raytune_ft.search(spec)):
        with pytest.raises(UserError) as e:
            call()
        assert "field 'train.max_epochs'" in str(e.value), str(e.value)
        where = {"path": f"{tmp_path / 'bad.yaml'}, line 4:", "text": "<spec>, line 4:",
                 "dict": "<dict>:"}[kind]
        assert str(e.value).startswith(where), str(e.value)
    assert not (tmp_path / "runs").exists()  # nothing written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_more_bad_input_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="file not found"):
        raytune_ft.load_spec(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="a spec is a path, YAML text, a dict or a Spec"):
        raytune_ft.load_spec(42)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="field 'run.num_samples'"):
        raytune_ft.load_spec(write_tiny_spec(tmp_path), ["run.num_samples=zero"])
    with pytest.raises(UserError, match="not an rtft run folder"):
        raytune_ft.results(tmp_path)
    with pytest.raises(UserError, match="not an rtft run folder"):
        raytune_ft.promote(tmp_path)
    # An error found after loading names the spec file and the field's YAML line, as the CLI.
    path = _write(tmp_path / "t.yaml", _tiny_text(tmp_path, weights=str(tmp_path / "no.pth")))
    with pytest.raises(UserError) as e:
        raytune_ft.validate(path)
    assert str(e.value).startswith(f"{path}, line 2: field 'model.weights'"), str(e.value)


def test_validate_returns_what_rtft_validate_prints(tmp_path: Path) -> None:
    path = write_tiny_spec(tmp_path)
    sets = ["run.num_samples=8", "searcher.portfolio=builtin"]
    found = raytune_ft.validate(path, sets, cluster_cpus=4)
    assert isinstance(found, raytune_ft.Validation)
    assert found.spec.run.num_samples == 8
    assert found.rungs == (((1, 8), (2, 4)),)  # ASHA, grace 1, η 2, 2 epochs
    assert found.fit is not None and (found.fit.fits, found.fit.at_once) == (4, 2)
    assert found.data.startswith("digits (built in): 10 classes")
    assert found.weights and found.models[0].table().startswith("resnet18")
    assert found.portfolio is not None and found.portfolio[0].startswith("portfolio (builtin)")
    res = CliRunner().invoke(main, ["validate", str(path), "--set", sets[0], "--set", sets[1],
                                    "--cluster-cpus", "4"])
    assert res.exit_code == 0, res.output
    for part in [found.data, found.weights, found.models[0].table(), *found.portfolio,
                 found.fit.line(found.spec), "  epoch    1:    8 trial(s)"]:
        assert part in res.output, part
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# A finished run read back: results, promote (no Ray)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as a search leaves it, with two made-up trials sharing one real
    checkpoint (as tests/cli/test_main.py's)."""
    from helpers import tiny_spec, train_tiny

    from raytune_ft.knobs import Hyperparams
    from raytune_ft.runs import TrialRecord, write_records
    from raytune_ft.spec.yaml_io import spec_to_yaml

    root = tmp_path_factory.mktemp("api-finished")
    spec = tiny_spec(root)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_epochs": 1})})
    history = train_tiny(spec, Hyperparams(batch_size=32, augment="none"), root / "ckpt")
    run = root / "runs" / "tiny"
    (run / "tune").mkdir(parents=True)
    state = run / "tune" / "experiment_state-2026-01-01_00-00-00.json"
    state.write_text("{}")
    os.utime(state, (1e9, 1e9))  # older than trials.json: the run is finished
    records = [TrialRecord("a1", {"lr": 0.005, "optimizer": "adamw", "freeze_depth": 1},
                           [{**history[-1], "val_acc": 0.8}], str(root / "ckpt")),
               TrialRecord("b2", {"lr": 0.002, "optimizer": "sgd", "momentum": 0.9,
                                  "freeze_depth": 0},
                           [{**history[-1], "val_acc": 0.9}], str(root / "ckpt"))]
    (run / "spec.yaml").write_text(spec_to_yaml(spec))
    write_records(run, records)
    return run


def test_results_is_the_trials_of_rtft_results(finished_run: Path) -> None:
    df = raytune_ft.results(finished_run)
    assert list(df["trial"]) == ["b2", "a1"]  # best first
    assert list(df.columns[:4]) == ["trial", "state", "epochs", "best_val_acc"]
    assert {"params", "flops", "latency_b1_ms", "epoch_s", "lr", "optimizer", "momentum",
            "freeze_depth", "error"} <= set(df.columns)
    assert list(df["state"]) == ["completed", "completed"] and list(df["epochs"]) == [1, 1]
    assert df.loc[0, "momentum"] == 0.9 and df.loc[1, "momentum"] != df.loc[1, "momentum"]
    rows = json.loads(CliRunner().invoke(main, ["results", str(finished_run), "--json"]).output)
    assert [r["trial"] for r in rows] == list(df["trial"])
    assert [r["best_val_acc"] for r in rows] == list(df["best_val_acc"])


def test_promote_returns_the_promoted_models(finished_run: Path) -> None:
    said: list[str] = []
    models = raytune_ft.promote(finished_run, echo=said.append)
    assert len(models) == 1
    (m,) = models
    assert isinstance(m, raytune_ft.promote.PromotedModel)
    assert m.metrics["trial_id"] == "b2" and Path(m.metrics["path"]).is_dir()
    assert m.classes == [str(i) for i in range(10)] and not m.model.training
    assert any(line.startswith("promoted trial b2 (resnet18, rank 1)") for line in said)
    again = raytune_ft.promote(finished_run, pareto=True, echo=said.append)
    assert [x.metrics["path"] for x in again] != [m.metrics["path"]]  # a new version


# --------------------------------------------------------------------------------------------
# Real searches: three in one process with the instant trainer
# --------------------------------------------------------------------------------------------
# A fresh process, as a user's script or notebook is (and as tests/search/test_run.py runs
# run_search): Ray's workers inherit its environment, and with it bench/plugins/instant_trainer.
DRIVER = """\
import json, sys
from pathlib import Path
import ray, yaml
import raytune_ft as rtft
spec_file = Path(sys.argv[1])
text = spec_file.read_text()
out = {}
for kind, spec in [("path", spec_file), ("text", text), ("dict", yaml.safe_load(text))]:
    r = rtft.search(spec, overrides=[f"name=by-{kind}", "train.max_epochs=3"])  # echo: print
    assert not ray.is_initialized()  # the Ray this search started is shut down
    same = rtft.results(r.run_dir)
    assert same.equals(r.trials), (same, r.trials)
    out[kind] = {"run_dir": str(r.run_dir), "trials": r.trials.to_dict("records"),
                 "best": r.best, "promoted": r.promoted, "dirs": [str(d) for d in r.model_dirs],
                 "repr": repr(r), "wall_s": r.wall_s}
print("OUTCOME " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def three_searches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    root = tmp_path_factory.mktemp("api-searches")
    spec_file = write_tiny_spec(root, n=4)
    code, out, outcome = run_instant_driver(DRIVER, [str(spec_file)], cwd=root, timeout=400)
    assert code == 0, out[-6000:]
    return root, out, outcome


@pytest.mark.slow  # three searches, each starting its own Ray: ~40 s
def test_three_searches_in_one_process_print_progress(three_searches) -> None:  # noqa: ANN001
    root, out, outcome = three_searches
    assert list(outcome) == ["path", "text", "dict"]
    assert "PicklingError" not in out
    for kind, r in outcome.items():
        run_dir = root / "runs" / f"by-{kind}"
        assert r["run_dir"] == str(run_dir) and (run_dir / "trials.json").is_file()
        # echo=None prints what `rtft search` prints
        assert f"results: {run_dir}" in out and "tensorboard --logdir" in out
        assert r["repr"].startswith(f"SearchResult(run_dir='{run_dir}', trials=4, best=")
    assert out.count("4 trials: ") == 3
    assert out.count("nothing to promote: no trial finished an epoch with a checkpoint") == 3


@pytest.mark.slow
def test_the_search_result_is_its_run_folder(three_searches) -> None:  # noqa: ANN001
    root, _, outcome = three_searches
    r = outcome["path"]
    trials = {t["trial_id"]: t for t in json.loads(
        (root / "runs" / "by-path" / "trials.json").read_text())}
    rows = r["trials"]
    assert [row["trial"] for row in rows] != [] and {row["trial"] for row in rows} == set(trials)
    for row in rows:
        t = trials[row["trial"]]
        assert row["epochs"] == len(t["history"])
        assert row["best_val_acc"] == max(h["val_acc"] for h in t["history"])
        assert row["lr"] == t["params"]["lr"] and row["optimizer"] == t["params"]["optimizer"]
        assert row["state"] == ("completed" if row["epochs"] == 3 else f"stopped@{row['epochs']}")
    accs = [row["best_val_acc"] for row in rows]
    assert accs == sorted(accs, reverse=True)  # best first
    # Nothing promoted (no checkpoint): the best trial is the first row.
    assert r["promoted"] is None and r["dirs"] == [] and r["best"] == rows[0]
    # The three forms of one spec ran the same search (the instant trainer is deterministic).
    assert [row["lr"] for row in outcome["dict"]["trials"]] == [row["lr"] for row in rows]


@pytest.mark.slow
def test_optuna_dashboard_reads_the_runs_journal(three_searches) -> None:  # noqa: ANN001
    """`optuna-dashboard RUN/optuna.journal` opens the study with Optuna's JournalStorage over
    a JournalFileBackend (a file that is not SQLite); read it the same way: one study named
    after the run, each trial COMPLETE or PRUNED with its value per epoch and its params."""
    root, _, outcome = three_searches
    run_dir = root / "runs" / "by-path"
    trials = {t["trial_id"]: t for t in json.loads((run_dir / "trials.json").read_text())}
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.study_name == "by-path" and summary.n_trials == 4
    study = optuna.load_study(study_name="by-path", storage=storage)
    states = []
    for ft in study.trials:
        (t,) = [t for t in trials.values()
                if all(t["params"].get(k) == v for k, v in ft.params.items())]
        assert set(ft.params) >= {"lr", "optimizer", "freeze_depth"}
        by_epoch = {h["epoch"]: h["val_acc"] for h in t["history"]}
        assert ft.intermediate_values == by_epoch
        if len(by_epoch) == 3:
            assert ft.state == optuna.trial.TrialState.COMPLETE
            assert ft.value == max(by_epoch.values())
        else:
            assert ft.state == optuna.trial.TrialState.PRUNED
        states.append(ft.state.name)
    assert "COMPLETE" in states and "PRUNED" in states, states

    # optuna-dashboard itself (the test extra): the storage it makes of the file's path, and
    # its JSON API over that storage, called in-process (no server, no port).
    dashboard = pytest.importorskip("optuna_dashboard")
    from optuna_dashboard._storage_url import get_storage  # what its CLI calls on the path

    app = dashboard.wsgi(get_storage(str(run_dir / "optuna.journal")))

    def get(url: str) -> dict:
        from wsgiref.util import setup_testing_defaults

        env: dict = {"PATH_INFO": url, "REQUEST_METHOD": "GET"}
        setup_testing_defaults(env)
        status: list[str] = []
        body = b"".join(app(env, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), (url, status, body[:300])
        return json.loads(body)

    (listed,) = get("/api/studies")["study_summaries"]
    assert listed["study_name"] == "by-path"
    shown = get(f"/api/studies/{listed['study_id']}")["trials"]
    assert sorted(t["state"] for t in shown) == sorted(st.capitalize() for st in states)
    for t in shown:
        assert {p["name"] for p in t["params"]} >= {"lr", "optimizer", "freeze_depth"}
        assert [v["step"] for v in t["intermediate_values"]] == list(
            range(1, len(t["intermediate_values"]) + 1))


# --------------------------------------------------------------------------------------------
# A real search that trains and promotes, in this process (the session's Ray, reused)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # trains 3 tiny trials: ~10 s
def test_search_trains_and_promotes_on_the_sessions_ray(ray_session, tmp_path: Path) -> None:  # noqa: ANN001
    from raytune_ft.data import prepare
    from raytune_ft.promote import PromotedModel
    from raytune_ft.train import evaluate

    said: list[str] = []
    spec = yaml.safe_load(_tiny_text(tmp_path, n=3))
    r = raytune_ft.search(spec, echo=said.append)
    assert ray_session.is_initialized()  # a Ray this process ran already: kept
    assert isinstance(r.promoted, PromotedModel) and len(r.model_dirs) == 1
    assert r.best is not None and r.best["trial"] == r.promoted.metrics["trial_id"]
    assert r.best["state"] == "completed" and len(r.trials) == 3
    assert any(line.startswith("promoted trial ") for line in said)
    data = prepare(r.spec.data)
    _, acc = evaluate(r.promoted.model, data.test_x, data.test_y,
                      mean=tuple(r.promoted.config["mean"]), std=tuple(r.promoted.config["std"]))
    assert acc == pytest.approx(r.promoted.metrics["test"]["acc"])
    assert raytune_ft.results(r.run_dir).equals(r.trials)


# --------------------------------------------------------------------------------------------
# The quick-start notebook, in a real Jupyter kernel
# --------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real search from a kernel: ~60 s
def test_the_quickstart_notebook_runs_in_a_real_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "docs" / "quickstart.ipynb", as_version=4)
    # The kernel inherits this environment: short private temporary folders for the notebook
    # (where it writes its run) and for Ray (whose dashboard binds AF_UNIX sockets under
    # TMPDIR: under pytest's long tmp_path they exceed the 107-byte limit), the session's cache.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rtft-nb-", dir="/tmp"))
    (ray_tmp / "t").mkdir()
    monkeypatch.setenv("TMPDIR", str(ray_tmp / "t"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "docs")}})
    try:
        t0 = time.monotonic()
        client.execute()
        took = time.monotonic() - t0
        made = {p.relative_to(ray_tmp / "t") for p in (ray_tmp / "t").glob(
            "rtft-quickstart-*/*/*")} | {Path(m.relative_to(ray_tmp / "t")) for m in (
            ray_tmp / "t").glob("rtft-quickstart-*/models/*/v1/model.safetensors")}
        runs = [ray_tmp / "t" / p for p in made if p.parts[1] == "rtft_runs"]
        trials_ok = all((r / "trials.json").is_file() for r in runs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                     for o in outputs)
    assert not [o for o in outputs if o.output_type == "error"], text[-3000:]
    assert "promoted trial " in text and "held-out test acc" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot, the digits
    # The start lines survive in the cell (Tune's notebook reporter cleared them), and no
    # flood of Ray's worker logs (`(rtft <run> trial <id> pid=…)`) reaches it.
    assert "results: " in text and "Ray dashboard: http://127.0.0.1:" in text, text[:2000]
    assert not re.search(r"pid=\d+", text), text[-3000:]
    assert len(runs) == 1 and trials_ok, sorted(made)
    assert any(p.name == "model.safetensors" for p in made), sorted(made)
    print(f"notebook: {took:.0f} s")


def test_search_and_promote_behave_as_attributes_of_the_package() -> None:
    """They pickle and copy as themselves (a process pool, Ray remote), complete the module's
    names, and a test double assigned or patched over them is used, then gone."""
    import copy
    import pickle
    from unittest import mock

    import raytune_ft

    s = raytune_ft.search
    assert pickle.loads(pickle.dumps(s)) is s and copy.deepcopy(s) is s
    import raytune_ft.search.run  # noqa: F401  (the submodule set on the package: ignored)

    assert raytune_ft.search is s and "run" in dir(s)
    with mock.patch("raytune_ft.search") as fake:
        assert raytune_ft.search is fake
    assert raytune_ft.search is s
    raytune_ft.promote = len
    try:
        assert raytune_ft.promote is len
    finally:
        del raytune_ft.promote
    assert callable(raytune_ft.promote) and raytune_ft.promote is not len
