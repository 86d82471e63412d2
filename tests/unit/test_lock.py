"""The lock files agree with pyproject.toml: every requirement it declares is pinned, in every environment the locks
serve, to one version its specifier admits; every pin carries hashes; a package has one version in all the locks.
When this fails, run `make lock` (the Makefile's header says how the locks are made)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
LOCKS = (RUNTIME_LOCK, DEV_LOCK, BUILD_LOCK)
REGENERATE = "make lock"


def _environment(system: str, machine: str, python: str) -> dict[str, str]:
    """PEP 508 marker values of CPython `python` (X.Y.Z) on `system` (linux, darwin) and `machine`."""
    return {
        "implementation_name": "cpython",
        "implementation_version": python,
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": system,
        "platform_system": {"linux": "Linux", "darwin": "Darwin"}[system],
        "platform_machine": machine,
        "platform_release": "",
        "platform_version": "",
        "python_version": python.rpartition(".")[0],
        "python_full_version": python,
    }


#: Where the locks are installed: CI (3.11, x86-64), the image (3.12 on arm64 and amd64), developers' Linux and Macs,
#: and the newer Pythons the universal lock covers too.
ENVIRONMENTS = {
    "ci-linux-x86_64-3.11": _environment("linux", "x86_64", "3.11.7"),
    "image-linux-aarch64-3.12": _environment("linux", "aarch64", "3.12.8"),
    "image-linux-x86_64-3.12": _environment("linux", "x86_64", "3.12.8"),
    "linux-x86_64-3.13": _environment("linux", "x86_64", "3.13.1"),
    "macos-arm64-3.12": _environment("darwin", "arm64", "3.12.8"),
    "macos-x86_64-3.11": _environment("darwin", "x86_64", "3.11.9"),
    "macos-arm64-3.14": _environment("darwin", "arm64", "3.14.0"),
}


@dataclass(frozen=True, slots=True)
class Pin:
    name: NormalizedName
    version: str
    marker: Marker | None
    hashes: frozenset[str]

    def applies(self, environment: dict[str, str]) -> bool:
        return self.marker is None or self.marker.evaluate(environment)


def read_lock(path: Path) -> list[Pin]:
    """The pins of a requirements file as pip reads it: backslash continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins: list[Pin] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: an option line {line!r}; a lock holds pins only"
        hashes = frozenset(re.findall(r"--hash=(\S+)", line))
        requirement = Requirement(re.sub(r"\s*--hash=\S+", "", line))
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {requirement} is not pinned exactly"
        assert not requirement.url, f"{path.name}: {requirement} installs from a URL"
        assert not requirement.extras, f"{path.name}: {requirement} has extras (uv lists what they pull in instead)"
        assert hashes, f"{path.name}: {requirement} has no hash (pip --require-hashes refuses it)"
        assert all(value.startswith("sha256:") for value in hashes), f"{path.name}: {requirement}"
        pins.append(Pin(canonicalize_name(requirement.name), specifier.version, requirement.marker, hashes))
    assert pins, f"{path.name} pins nothing"
    return pins


def resolved(pins: list[Pin], environment: dict[str, str]) -> dict[NormalizedName, Pin]:
    """The one pin per package that pip installs in `environment`."""
    out: dict[NormalizedName, Pin] = {}
    for pin in pins:
        if pin.applies(environment):
            assert pin.name not in out, f"two pins of {pin.name} apply to the same environment"
            out[pin.name] = pin
    return out


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements(group: str) -> list[Requirement]:
    pyproject = _pyproject()
    runtime = [Requirement(text) for text in pyproject["project"]["dependencies"]]
    if group == "runtime":
        return runtime
    if group == "dev":
        return runtime + [Requirement(text) for text in pyproject["project"]["optional-dependencies"]["dev"]]
    assert group == "build"
    return [Requirement(text) for text in pyproject["build-system"]["requires"]]


@pytest.fixture(scope="module")
def locks() -> dict[Path, list[Pin]]:
    return {path: read_lock(path) for path in LOCKS}


@pytest.mark.parametrize(
    ("group", "lock"), [("runtime", RUNTIME_LOCK), ("dev", DEV_LOCK), ("build", BUILD_LOCK)], ids=str
)
@pytest.mark.parametrize("where", ENVIRONMENTS)
def test_every_requirement_of_pyproject_is_pinned_to_a_version_it_admits(
    locks: dict[Path, list[Pin]], group: str, lock: Path, where: str
) -> None:
    environment = ENVIRONMENTS[where]
    pins = resolved(locks[lock], environment)
    problems = []
    for requirement in _requirements(group):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement}: not in {lock.name}")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement}: {lock.name} pins {pin.version}")
    assert not problems, f"pyproject.toml and the lock disagree ({REGENERATE}): {problems}"


@pytest.mark.parametrize("where", ENVIRONMENTS)
def test_a_package_has_one_version_and_the_same_files_in_every_lock(locks: dict[Path, list[Pin]], where: str) -> None:
    """CI tests (dev lock) the versions the image ships (runtime lock), built by the backend the dev venv holds."""
    environment = ENVIRONMENTS[where]
    dev = resolved(locks[DEV_LOCK], environment)
    for lock in (RUNTIME_LOCK, BUILD_LOCK):
        for name, pin in resolved(locks[lock], environment).items():
            if lock is RUNTIME_LOCK:
                assert name in dev, f"{name} is in {lock.name} but not in {DEV_LOCK.name} ({REGENERATE})"
            if name in dev:
                assert (pin.version, pin.hashes) == (dev[name].version, dev[name].hashes), (
                    f"{name}: {lock.name} and {DEV_LOCK.name} disagree ({REGENERATE})"
                )


def test_the_runtime_lock_holds_no_dev_tool(locks: dict[Path, list[Pin]]) -> None:
    """`make run` and the image install requirements.lock: none of the toolchain that only the dev extra needs."""
    runtime = {canonicalize_name(requirement.name) for requirement in _requirements("runtime")}
    dev_only = {canonicalize_name(requirement.name) for requirement in _requirements("dev")} - runtime
    pinned = {pin.name for pin in locks[RUNTIME_LOCK]}
    assert {"pytest", "mypy", "ruff"} <= dev_only
    assert not pinned & {"pytest", "mypy", "ruff", "moto", "hypothesis", "grpcio-tools", "setuptools"}, pinned


@pytest.mark.parametrize("lock", LOCKS, ids=lambda path: path.name)
def test_each_lock_names_the_command_that_regenerates_it(lock: Path) -> None:
    header = lock.read_text(encoding="utf-8").splitlines()[:3]
    assert f"#    {REGENERATE}" in header, header
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^lock:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe is not None, "the Makefile has no lock target"
    assert f"-o {lock.name} " in recipe.group(1)


def test_the_makefile_installs_the_locks_with_hashes_and_the_project_without_dependencies() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    installs = [line.strip() for line in makefile.splitlines() if re.search(r"pip\)? install ", line, flags=re.I)]
    locked = [line for line in installs if " -r " in line]
    assert locked
    assert all("--require-hashes" in line and "-r requirements-build.lock" in line for line in locked), locked
    project = [line for line in installs if line.endswith(" -e .")]
    assert project
    assert all("--no-deps" in line and "--no-build-isolation" in line for line in project), project
    assert re.search(r"^\$\(RUN_STAMP\): requirements\.lock ", makefile, flags=re.MULTILINE)
    assert re.search(r"^\$\(DEV_STAMP\): requirements-dev\.lock ", makefile, flags=re.MULTILINE)
    assert re.search(r"^run: \$\(RUN_STAMP\)$", makefile, flags=re.MULTILINE)
    assert re.search(r"^test: \$\(DEV_STAMP\)$", makefile, flags=re.MULTILINE)


def _make_dry_run(*arguments: str, venv: Path) -> list[str]:
    """What `make` would run, without running it (``-n``), with the venv pointed at a directory that does not
    exist: every install step shows."""
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", *arguments],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_the_runtime_lock_only_and_listens_on_loopback(tmp_path: Path) -> None:
    """Issue 15 #6: `make run` is a runtime install (no pytest, mypy, ruff) and its demo listens on 127.0.0.1
    unless LISTEN_HOST says otherwise; `serve` itself keeps 0.0.0.0 for the container."""
    venv = tmp_path / "fresh"
    commands = _make_dry_run("run", venv=venv)
    installs = [line for line in commands if " install " in line and " -r " in line]
    assert installs
    assert all("-r requirements.lock" in line and "requirements-dev.lock" not in line for line in installs)
    assert commands[-1] == f"{venv}/bin/fpolicyd serve --listen-host 127.0.0.1"
    exposed = _make_dry_run("run", "LISTEN_HOST=0.0.0.0", venv=venv)
    assert exposed[-1] == f"{venv}/bin/fpolicyd serve --listen-host 0.0.0.0"
    from fpolicyd.config import Settings

    assert Settings.model_fields["listen_host"].default == "0.0.0.0"  # the container's default
