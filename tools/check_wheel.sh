#!/usr/bin/env bash
# The install path of a user who has no checkout: sdist -> CPU-only wheel built from that sdist
# -> a throwaway virtualenv -> import fastkd and run its compiled CPU kernels from outside the
# source tree. Run by `make test` (hence CI); a few minutes on 2 cores, most of it the compile.
#
# Usage: tools/check_wheel.sh [PYTHON]     PYTHON: the interpreter whose torch to build against
#        (default: .venv/bin/python). It needs setuptools, wheel, ninja, torch and `build`.
#
# The throwaway virtualenv reuses PYTHON's packages (torch is GBs) through a .pth file naming
# PYTHON's site-packages. Directories added by a .pth do not get their own .pth files run, so
# an editable fastkd installed there stays invisible: `import fastkd` can only find the wheel.
set -euo pipefail
trap 'echo "check_wheel: FAILED (line $LINENO: $BASH_COMMAND)" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$(command -v "${1:-.venv/bin/python}") || { echo "check_wheel: no python ${1:-.venv/bin/python}" >&2; exit 1; }
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the steps below change dir

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastkd-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "check_wheel: [$((SECONDS))s] $*"; }

step "sdist (python -m build --sdist --no-isolation)"
# setuptools writes fastkd.egg-info into the tree; remove it unless it was there already.
EGG_INFO_WAS_THERE=$(test -e fastkd.egg-info && echo 1 || echo 0)
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" >"$WORK/sdist.log" 2>&1 ||
    { cat "$WORK/sdist.log" >&2; false; }
[ "$EGG_INFO_WAS_THERE" = 1 ] || rm -rf fastkd.egg-info
SDIST=$(echo "$WORK"/dist/fastkd-*.tar.gz)
test -f "$SDIST"

# From the sdist only, CPU kernels only (FASTKD_BUILD_CUDA=0 even where CI sets 1), built
# against PYTHON's torch: --no-build-isolation, or pip would fetch another torch to build with.
step "wheel from $(basename "$SDIST") (FASTKD_BUILD_CUDA=0, no build isolation)"
FASTKD_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-index \
    --wheel-dir "$WORK/wheel" "$SDIST"
WHEEL=$(echo "$WORK"/wheel/fastkd-*.whl)
test -f "$WHEEL"

step "throwaway virtualenv reusing $("$PY" -c 'import torch; print("torch", torch.__version__)')"
"$PY" -m venv --without-pip "$WORK/venv"
VPY=$WORK/venv/bin/python
"$PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_base_env.pth"
# --ignore-installed: the base env's own fastkd (editable) is not this env's to uninstall.
"$VPY" -m pip install -q --no-deps --no-index --ignore-installed "$WHEEL"

step "import and run from $WORK (not the source tree)"
cd "$WORK"
# -I: no PYTHONPATH, no current directory on sys.path.
env -u PYTHONPATH "$VPY" -I - "$(basename "$WHEEL")" <<'EOF'
import importlib.metadata
import sys

import torch

import fastkd

wheel = sys.argv[1]
assert fastkd.__file__.startswith(sys.prefix + "/"), f"imported {fastkd.__file__}, not the wheel"
assert wheel.startswith(f"fastkd-{fastkd.__version__}-"), (wheel, fastkd.__version__)
assert importlib.metadata.version("fastkd") == fastkd.__version__
cpu = fastkd.available_backends()["cpu"]
assert cpu["available"] and "fkd" in cpu["ops"], f"compiled CPU kernels missing: {cpu}"

torch.manual_seed(0)
s = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
t = torch.randn(7, 3, dtype=torch.float64)
loss = fastkd.fkd_loss(s, t, backend="cpu")
(grad,) = torch.autograd.grad(loss, s)
ref = fastkd.fkd_loss(s, t, backend="reference")
(ref_grad,) = torch.autograd.grad(ref, s)
torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12 * ref_grad.abs().max().item())
print(f"check_wheel: fastkd {fastkd.__version__} from {fastkd.__file__}: loss {loss.item():.6g}")
EOF
env -u PYTHONPATH "$WORK/venv/bin/fastkd" --help >/dev/null
step "OK: $(basename "$WHEEL")"
