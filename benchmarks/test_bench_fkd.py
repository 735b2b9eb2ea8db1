"""FKD (SPEC §1): each available backend and algorithm (tiled, dual, auto) against the eager
and compiled reference, forward, backward and full step. Cases: ``conftest.py``."""

OP = "fkd"


def test_fkd(benchmark, bench_case, run_bench_case):
    run_bench_case(benchmark, bench_case)
