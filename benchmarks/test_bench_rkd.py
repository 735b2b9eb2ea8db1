"""RKD distance (SPEC §2): the tiled CPU kernel against the eager and compiled reference,
forward, backward and full step. Cases: ``conftest.py``."""

OP = "rkd"


def test_rkd(benchmark, bench_case, run_bench_case):
    run_bench_case(benchmark, bench_case)
