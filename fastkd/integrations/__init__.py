"""Adapters that plug fastkd's losses into other training frameworks.

Each adapter is an optional extra and imports its framework on import, so nothing here is
imported by ``import fastkd``:

- :mod:`fastkd.integrations.torchdistill` (``pip install fastkd[torchdistill]``): mid-level
  losses ``fastkd.FKDLoss``, ``fastkd.SPKDLoss``, ``fastkd.RKDLoss``, ``fastkd.SRDLoss`` and the
  auxiliary model wrapper ``fastkd.SRDModelWrapper`` for torchdistill's YAML registries.
"""
