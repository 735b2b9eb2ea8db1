"""SRD (SPEC §3): each available fused backend against the eager and compiled reference,
forward, backward and full step. Skipped until ``fastkd.srd_loss`` exists. Cases:
``conftest.py``."""

OP = "srd"


def test_srd(benchmark, bench_case, run_bench_case):
    run_bench_case(benchmark, bench_case)
