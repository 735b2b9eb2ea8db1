"""Old module paths of fastkd, kept importable as aliases of the new modules.

Before the layered layout (docs/architecture.md) the library was flat. Each old path below is
the new module itself (same objects), registered in ``sys.modules`` and as an attribute of the
package, so ``import fastkd.fkd`` and ``from fastkd.backends import resolve_backend`` keep
working. ``fastkd.relational`` held both SP and RKD; it is a small module re-exporting both.
"""

from __future__ import annotations

import importlib
import sys
import types

# old path -> new module
ALIASES = {
    "fastkd.fkd": "fastkd.losses.fkd",
    "fastkd.dual": "fastkd.losses.fkd_dual",
    "fastkd.srd": "fastkd.losses.srd",
    "fastkd.backends": "fastkd.registry",
    "fastkd._ops": "fastkd.ops",
    "fastkd._validate": "fastkd.validation",
}
# fastkd.relational: the names it had, from the modules that hold them now
RELATIONAL = {
    "fastkd.losses.sp": ("SP_ALGORITHMS", "SPLoss", "sp_loss"),
    "fastkd.losses.rkd": ("RKDDistanceLoss", "RKDFunction", "rkd_distance_loss"),
}


def _relational() -> types.ModuleType:
    module = types.ModuleType(
        "fastkd.relational",
        "Old home of SP and RKD distance: now fastkd.losses.sp and fastkd.losses.rkd.",
    )
    for source, names in RELATIONAL.items():
        new = importlib.import_module(source)
        for name in names:
            setattr(module, name, getattr(new, name))
    return module


def install() -> None:
    """Register the old paths (idempotent)."""
    package = sys.modules["fastkd"]
    modules = {old: importlib.import_module(new) for old, new in ALIASES.items()}
    modules["fastkd.relational"] = sys.modules.get("fastkd.relational") or _relational()
    for old, module in modules.items():
        sys.modules[old] = module
        setattr(package, old.rsplit(".", 1)[1], module)
