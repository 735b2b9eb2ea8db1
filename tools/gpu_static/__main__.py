"""``python -m tools.gpu_static``: compile every kernel for sm_80/sm_90 without a GPU, check it,
and write the report.

    python -m tools.gpu_static --sweep full --write docs/gpu-static.md   # regenerate the report
    python -m tools.gpu_static --check                                   # CI subset, exit 1 on FAIL

Triton must compile, not interpret: TRITON_INTERPRET is removed from the environment before
Triton is imported. The compile cache defaults to build/triton-gate-cache (reruns are fast).
"""

from __future__ import annotations

import os
import sys

# Before any Triton import (the decorator reads it): compile, do not interpret.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def _load_variants(spec: str) -> list:
    """``path/to/file.py:function`` -> the variants that function returns."""
    path, _, func = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(
        "gpu_static_extra_" + os.path.basename(path).removesuffix(".py"), path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return list(getattr(module, func)())


def _to_json(results, kernels) -> dict:
    from tools.gpu_static import report

    def triton(r):
        status, why = report.triton_verdict(r)
        v = r.variant
        return {
            "op": v.op, "kernel": v.kernel, "config": v.config, "dtype": v.dtype,
            "precision": v.precision, "hot": v.hot, "arch": r.arch, "seconds": r.seconds,
            "error": r.error, "status": status, "reasons": why,
            "ptx": dataclasses.asdict(r.ptx) if r.ptx else None,
            "resources": dataclasses.asdict(r.res) if r.res else None,
            "sass": dataclasses.asdict(r.sass) if r.sass else None, "shared": r.shared,
        }  # fmt: skip

    def cuda(k):
        status, why = report.cuda_verdict(k)
        return {
            "name": k.name, "arch": k.arch, "status": status, "reasons": why,
            "resources": dataclasses.asdict(k.res), "sass": dataclasses.asdict(k.sass),
        }  # fmt: skip

    return {"triton": [triton(r) for r in results], "cuda": [cuda(k) for k in kernels]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_static", description=__doc__)
    parser.add_argument("--sweep", choices=("ci", "full"), default="ci")
    parser.add_argument("--arch", default="80,90", help="comma-separated: 80,90")
    parser.add_argument("--ops", default="fkd,rkd,srd", help="Triton ops; 'none' for none")
    parser.add_argument("--variants", action="append", default=[],
                        help="extra variants: path/to/file.py:function")  # fmt: skip
    parser.add_argument("--so", default=None, help="CUDA extension (default fastkd/_C*.so)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA disassembly")
    parser.add_argument("--write", metavar="MD", help="write the markdown report here")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 if any assertion fails")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("TRITON_CACHE_DIR", os.path.abspath("build/triton-gate-cache"))
    from tools.gpu_static import report, sass_gate, triton_gate

    archs = tuple(int(a) for a in args.arch.split(","))
    ops = () if args.ops == "none" else tuple(args.ops.split(","))
    variants = triton_gate.variants(args.sweep, ops)
    for spec in args.variants:
        variants += _load_variants(spec)

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = triton_gate.compile_all(variants, archs, log)
    kernels = []
    if not args.no_cuda:
        so = args.so or sass_gate.find_extension()
        if so is None:
            log("no fastkd/_C*.so: CUDA kernels skipped")
        else:
            kernels = sass_gate.cuda_kernels(so)
            if not any(k.arch in archs for k in kernels):
                log(f"{so} has no SASS for {archs}: built without CUDA kernels?")
    log(f"{len(results)} Triton compilations, {len(kernels)} CUDA kernels, "
        f"{time.perf_counter() - start:.0f} s")  # fmt: skip

    fails = report.failures(results, kernels)
    for line in fails:
        print("FAIL", line)
    if args.write:
        command = "python -m tools.gpu_static --sweep " + args.sweep + " --write " + args.write
        with open(args.write, "w") as f:
            f.write(report.markdown(results, kernels, command, args.sweep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_to_json(results, kernels), f, indent=1)
    print(f"gpu-static: {len(fails)} failure(s) in {len(results)} Triton compilations and "
          f"{len(kernels)} CUDA kernels")  # fmt: skip
    return 1 if (args.check and fails) else 0


if __name__ == "__main__":
    sys.exit(main())
