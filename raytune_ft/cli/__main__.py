"""`python -m raytune_ft.cli ARGS…` is `rtft ARGS…` (tests and benchmarks start it this way)."""

from raytune_ft.cli.main import main

main(prog_name="rtft")
