"""Developer tools of the fastkd repository (not part of the installed package)."""
