"""The sdist carries what a build needs, and the version is written once.

The sdist is made with ``setup.py egg_info --egg-base TMP sdist`` (seconds, nothing compiled) and
``FASTKD_BUILD_CUDA=0``, so CUDA sources reach it through MANIFEST.in alone, as on a machine
without a toolkit. A fresh egg-base matters: setuptools re-reads an existing SOURCES.txt, which
would keep files in the list that the MANIFEST.in rules no longer select. The full sdist ->
wheel -> import path is ``tools/check_wheel.sh`` (``make test``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import fastkd

ROOT = Path(__file__).resolve().parent.parent


def _git_files(*paths: str) -> set[str]:
    """Tracked and untracked-but-not-ignored files under ``paths`` that exist on disk."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return {f for f in proc.stdout.splitlines() if (ROOT / f).is_file()}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]:
    """(file name, {path inside the project: member}, open archive) of a fresh sdist."""
    out = tmp_path_factory.mktemp("sdist")
    env = {**os.environ, "FASTKD_BUILD_CUDA": "0"}
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out)]
    proc = subprocess.run(
        [*cmd, "sdist", "--dist-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = out.glob("*.tar.gz")
    tar = tarfile.open(archive)
    members = {}
    for m in tar.getmembers():
        top, _, rest = m.name.partition("/")
        assert top == archive.name.removesuffix(".tar.gz"), m.name
        if m.isfile():
            members[rest] = m
    yield archive.name, members, tar
    tar.close()


def test_sdist_carries_every_csrc_file(sdist):
    _, members, _ = sdist
    in_sdist = {p for p in members if p.startswith("csrc/")}
    in_git = _git_files("csrc")
    assert in_git, "git lists no file under csrc/"
    assert not in_git - in_sdist, f"missing from the sdist: {sorted(in_git - in_sdist)}"
    assert not in_sdist - in_git, f"in the sdist but not in git: {sorted(in_sdist - in_git)}"


def test_sdist_carries_the_package_and_build_files_but_no_build_outputs(sdist):
    _, members, _ = sdist
    needed = _git_files("fastkd", "setup.py", "pyproject.toml", "README.md", "docs/SPEC.md")
    needed = {f for f in needed if not f.startswith("fastkd/") or f.endswith(".py")}
    assert {"setup.py", "pyproject.toml", "README.md", "docs/SPEC.md"} <= needed
    assert not needed - members.keys(), f"missing from the sdist: {sorted(needed - members.keys())}"
    outputs = [p for p in members if p.endswith((".so", ".o", ".pyc")) or p.startswith("build/")]
    assert not outputs, f"build outputs in the sdist: {outputs}"


def test_sdist_version_is_the_package_version(sdist):
    name, members, tar = sdist
    assert name == f"fastkd-{fastkd.__version__}.tar.gz"
    pkg_info = tar.extractfile(members["PKG-INFO"]).read().decode()
    assert f"\nVersion: {fastkd.__version__}\n" in pkg_info


def test_version_is_written_once():
    """pyproject.toml has no version of its own: it reads ``fastkd.__version__``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "fastkd.__version__"


def test_installed_metadata_matches_this_checkout():
    """The installed distribution's version, when it is this checkout (editable install)."""
    try:
        dist = importlib.metadata.distribution("fastkd")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fastkd is not installed (source tree on PYTHONPATH)")
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if not url.startswith("file://") or Path(url.removeprefix("file://")).resolve() != ROOT:
        pytest.skip(f"the installed fastkd is not this checkout ({url or 'no direct_url.json'})")
    assert dist.version == fastkd.__version__, (
        f"installed metadata says {dist.version}, the code {fastkd.__version__}: reinstall "
        "(pip install --no-build-isolation -e .)"
    )
