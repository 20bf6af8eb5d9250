"""flexpbs's benchmark harness: every measurement users and maintainers rerun, as a subcommand.

Run from the repository root: ``python -m bench SUBCOMMAND [options]``; ``python -m bench --help`` lists
the subcommands and ``python -m bench SUBCOMMAND --help`` shows one's command lines and options. Inputs come
from :mod:`bench.workloads`, timers from :mod:`bench.timing`, the pipeline's stages from :mod:`bench.stages`.
Results print as markdown tables; files (JSON, plots) go to ``bench_out/`` unless told otherwise.
bench/RESULTS.md and bench/QUALITY.md hold the measurements, each with its command.
"""
