"""KubeCI benchmarks: `python -m bench` (or `make bench`) runs them and writes RESULTS.md.

Each figure is reported beside a limit measured on the same machine in the same run, so
the ratios mean something on any machine. Raw figures go to `bench/out/` as JSON.
"""
