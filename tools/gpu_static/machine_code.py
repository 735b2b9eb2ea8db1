"""Numbers from machine code: PTX text, SASS and resource usage (``cuobjdump``).

Everything here is text processing; the tools are the ``cuobjdump`` / ``nvdisasm`` shipped in
the triton wheel (``triton/backends/nvidia/bin``), so no CUDA toolkit is needed.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def nvidia_bin(tool: str) -> str:
    """Path of a tool shipped with Triton's NVIDIA backend (falls back to $PATH)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(path) if path.exists() else tool


# ---------------------------------------------------------------------------------------------
# PTX
# ---------------------------------------------------------------------------------------------

_PARAM = re.compile(r"^\s*\.param\s+(\.\w+)(?:\s+\.ptr)?.*?\s(\w+_param_\d+)", re.M)
# float64 arithmetic (not moves or conversions): what makes a kernel a "float64 kernel"
_F64_ARITH = re.compile(
    r"^\s*(?:add|sub|mul|fma|div|sqrt|rcp|rsqrt|max|min|setp\.\w+|neg|abs)(?:\.\w+)*\.f64\b", re.M
)
_F64_IMM = re.compile(r"^\s*([a-z][\w.]*\.f64)\b[^\n]*?\b0d([0-9A-Fa-f]{16})\b", re.M)


def ptx_params(ptx: str) -> list[tuple[str, str]]:
    """(name, PTX type) of the entry's parameters in order, e.g. ("k_param_2", ".f32")."""
    return [(name, ty) for ty, name in _PARAM.findall(ptx)]


def is_float64_kernel(ptx: str) -> bool:
    return _F64_ARITH.search(ptx) is not None


def f32_rounded_f64_immediates(ptx: str) -> list[str]:
    """float64 immediates that are a decimal constant rounded to float32 first, e.g.
    ``0d3FB99999A0000000`` (0.1f) where 0.1 was meant: Triton types a Python float compared
    against a tensor (``x < 0.1``) as float32. A value is flagged when it is representable in
    float32 and the shortest decimal that names it in float32 means another float64."""
    found = []
    for instr, bits in _F64_IMM.findall(ptx):
        value = struct.unpack(">d", bytes.fromhex(bits))[0]
        if not np.isfinite(value) or value == 0.0:
            continue
        as_f32 = np.float32(value)
        if float(as_f32) != value:
            continue  # a genuine float64 constant
        mantissa = int(math.frexp(value)[0] * 2**24)
        if (mantissa & -mantissa).bit_length() > 12:
            continue  # <= 12 significant bits: a binary constant (2^54, 1.5), not a decimal
        if float(str(as_f32)) != value:  # numpy prints float32's shortest decimal
            found.append(f"{instr} 0d{bits.upper()} (= float32({as_f32}))")
    return found


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, re.M))


@dataclass
class PtxStats:
    params: list[tuple[str, str]]
    float64: bool
    f32_params: list[str]
    f32_immediates: list[str]
    mma: int
    wgmma: int
    local_ops: int
    mul_wide: int

    @classmethod
    def parse(cls, ptx: str) -> PtxStats:
        params = ptx_params(ptx)
        f64 = is_float64_kernel(ptx)
        return cls(
            params=params,
            float64=f64,
            f32_params=[n for n, t in params if t == ".f32"] if f64 else [],
            f32_immediates=f32_rounded_f64_immediates(ptx) if f64 else [],
            mma=count(r"^\s*mma\.sync\b", ptx),
            wgmma=count(r"^\s*wgmma\.mma_async\b", ptx),
            local_ops=count(r"^\s*(?:ld|st)\.local\b", ptx),
            mul_wide=count(r"^\s*mul\.wide\.[su]32\b", ptx),
        )


# ---------------------------------------------------------------------------------------------
# SASS and resource usage
# ---------------------------------------------------------------------------------------------

# SASS counters: opcode prefixes (an opcode is "HMMA.16816.F32", "LDG.E.128", ...)
SASS_OPS = {
    "HMMA": ("HMMA.",),
    "HGMMA": ("HGMMA.",),
    "DMMA": ("DMMA.",),
    "LDSM": ("LDSM.",),
    "FFMA": ("FFMA",),
    "DFMA": ("DFMA",),
    "LDL/STL": ("LDL", "STL"),
    "LDG.128": ("LDG.E.128",),
    "LDG": ("LDG.",),
}


def opcode(text: str) -> str:
    """The opcode of a SASS instruction ("@!P0 BRA `(.L_x_1)" -> "BRA")."""
    parts = text.split(None, 2)
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


@dataclass
class Resources:
    regs: int = 0
    stack: int = 0
    shared: int = 0
    local: int = 0


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:`\()?\s*(?:0x)?([0-9a-f]+)")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of each SASS instruction."""
    return [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]


def loop_ranges(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """[target, branch] address ranges of backward branches: the loop bodies."""
    ranges = []
    for addr, text in instrs:
        if m := _BRANCH.search(text):
            target = int(m.group(1), 16)
            if target <= addr:
                ranges.append((target, addr))
    return ranges


@dataclass
class SassStats:
    ops: dict[str, int] = field(default_factory=dict)
    spill_ops_in_loops: int = 0  # LDL/STL inside a loop body: spill traffic per iteration

    @classmethod
    def parse(cls, sass: str) -> SassStats:
        instrs = sass_instructions(sass)
        loops = loop_ranges(instrs)
        ops = dict.fromkeys(SASS_OPS, 0)
        in_loops = 0
        for addr, text in instrs:
            op = opcode(text)
            for name, prefixes in SASS_OPS.items():
                if op.startswith(prefixes) and (name not in ("FFMA", "DFMA") or op[4:5] in "."):
                    ops[name] += 1
            if op.startswith(("LDL", "STL")) and any(a <= addr <= b for a, b in loops):
                in_loops += 1
        return cls(ops, in_loops)


_FUNC = re.compile(r"^\s*Function\s+(\S+):\s*$")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_ARCH = re.compile(r"^\s*arch\s*=\s*sm_(\d+)")
_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")


def disassemble(path: str) -> tuple[dict, dict]:
    """One ``cuobjdump -res-usage -sass`` of a cubin or a shared library:
    ({(arch, mangled function): Resources}, {(arch, mangled function): SASS text})."""
    out = subprocess.run(
        [nvidia_bin("cuobjdump"), "-res-usage", "-sass", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    resources: dict[tuple[int, str], Resources] = {}
    sass: dict[tuple[int, str], list[str]] = {}
    arch, res_func, key = 0, None, None
    for line in out.splitlines():
        if m := _ARCH.match(line):
            arch, key = int(m.group(1)), None
        elif m := _SASS_FUNC.match(line):
            key = (arch, m.group(1))
            sass[key] = []
        elif m := _FUNC.match(line):
            res_func, key = m.group(1), None
        elif (m := _RES.search(line)) and res_func is not None:
            resources[(arch, res_func)] = Resources(*map(int, m.groups()))
            res_func = None
        elif key is not None:
            sass[key].append(line)
    return resources, {k: "\n".join(v) for k, v in sass.items()}


def cubin_stats(cubin: bytes) -> tuple[Resources, SassStats]:
    """Resources and SASS counts of a single-kernel cubin (Triton's ``asm["cubin"]``)."""
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        res, sass = disassemble(path)
    finally:
        os.unlink(path)
    return next(iter(res.values()), Resources()), SassStats.parse("\n".join(sass.values()))


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled C++ names (c++filt; names stay mangled without it)."""
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out, strict=False)) if len(out) == len(names) else {n: n for n in names}
