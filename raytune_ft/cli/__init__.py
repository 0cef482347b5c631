"""The command line, `rtft …`: the only package that imports Click.

| module        | its one job                                                                 |
|---------------|-----------------------------------------------------------------------------|
| `main`        | the `rtft` group and the commands of a search: search, validate, results, … |
| `jobs`        | `rtft submit`, `rtft jobs …` (Ray's JobSubmissionClient, through `jobs.py`) |
| `export`      | `rtft export MODEL_DIR`                                                     |
| `reproduce`   | `rtft reproduce RUN_DIR TRIAL_ID`                                           |
| `common`      | the error guard, the spec options and the spec loading every command shares |
| `job_entry`   | the entry point of a Ray job on a cluster (`rtft search` in a private copy) |

`rtft` is :func:`raytune_ft.cli.main.main`; `python -m raytune_ft.cli` runs it too.
"""
