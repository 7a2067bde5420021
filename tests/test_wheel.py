"""The built wheel installs one top-level package, ``peft_routing``: never a top-level ``kernels``, which is Hugging
Face's compute-kernels package (``transformers.integrations.hub_kernels`` imports it) and would be overwritten."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> list[str]:
    build_meta = pytest.importorskip("setuptools.build_meta")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):  # a clean copy: no build/ or egg-info of an editable install
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "peft_routing", source / "peft_routing", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cwd = os.getcwd()
    os.chdir(source)
    try:
        wheel = build_meta.build_wheel(str(out))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(out / wheel) as archive:
        return archive.namelist()


def test_wheel_has_no_top_level_kernels_package(wheel_files):
    top_level = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"peft_routing"}


def test_wheel_holds_the_kernels_under_our_name_and_the_cpu_kernel_source(wheel_files):
    kernels = {Path(name).name for name in wheel_files if name.startswith("peft_routing/kernels/")}
    assert {"__init__.py", "launch.py", "route.py", "align.py", "shrink.py", "expand.py", "dense.py"} <= kernels
    assert "peft_routing/ops/csrc/routed_lora.cpp" in wheel_files
    for wing in ("ops", "tuner", "io", "workflow", "demo"):
        assert f"peft_routing/{wing}/__init__.py" in wheel_files


def test_no_top_level_kernels_folder_shadows_hugging_faces_package():
    """Python puts the working directory first on sys.path (``python -c``, ``python -m pytest``): a ``kernels/``
    folder at the repository root would hide the ``kernels`` package transformers imports, and break it."""
    assert not (REPO / "kernels").exists()
