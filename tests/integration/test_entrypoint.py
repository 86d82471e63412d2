"""What the container runs, without a container engine: the wheel built from the Docker build context (what
.dockerignore lets through), installed into a fresh venv with its dependencies from PyPI (as the Dockerfile's
builder stage does), then the image's ENTRYPOINT + CMD
and HEALTHCHECK, parsed from the Dockerfile, run with the image's ENV (data dir and ports redirected to temporary
ones). SIGTERM must end it cleanly with exit 0."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from support.deploy_files import DOCKERFILE, ROOT, entrypoint_and_cmd, healthcheck_command, image_env, parse_dockerfile

#: Building the wheel and installing its dependencies from PyPI takes 30-75 s on the shared 2-core box.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Where the Dockerfile installs the venv; replaced by the test's venv in the image's PATH.
IMAGE_VENV_BIN = "/opt/fpolicyd/bin"
READINESS_ATTEMPTS = 100


def _build_context(tmp_path: Path) -> Path:
    """What `docker build` sends: only the paths .dockerignore re-includes (it starts by excluding everything)."""
    context = tmp_path / "context"
    context.mkdir()
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        if not line.startswith("!"):
            continue
        source = ROOT / line[1:].rstrip("/")
        if source.is_dir():
            shutil.copytree(source, context / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
        else:
            shutil.copy2(source, context / source.name)
    return context


def _install_fresh(tmp_path: Path) -> Path:
    """Build the wheel from the Docker build context and install it (with its dependencies, from PyPI) into a new
    venv, as the builder stage does."""
    wheels = tmp_path / "wheels"
    context = _build_context(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(context)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("fpolicyd-*.whl")
    venv = tmp_path / "venv"
    # No pip inside the venv (ensurepip alone takes ~10 s here): this pip installs into it (--python), and
    # --no-compile skips byte-compiling botocore & co. — the image compiles them; nothing else differs.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")),
            *("install", "--quiet", "--no-compile", "--disable-pip-version-check", str(wheel)),
        ],
        check=True,
        timeout=300,
    )
    return venv / "bin"


def _container_environment(bin_dir: Path, data_dir: Path) -> dict[str, str]:
    """The image's ENV with its paths and ports pointed at this test: nothing is inherited from the test process
    except what a container also gets (PATH, HOME)."""
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    env = image_env(instructions)
    env["PATH"] = env["PATH"].replace(IMAGE_VENV_BIN, str(bin_dir)).replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    assert env["FPOLICYD_DATA_DIR"]
    env.update(
        HOME=str(data_dir),
        FPOLICYD_DATA_DIR=str(data_dir),
        FPOLICYD_LISTEN_HOST="127.0.0.1",
        FPOLICYD_LISTEN_PORT="0",
        FPOLICYD_HTTP_PORT="0",
    )
    return env


async def _wait_for_ports(stream: asyncio.StreamReader, log: list[dict[str, Any]]) -> tuple[int, int]:
    fpolicy_port = http_port = None
    while fpolicy_port is None or http_port is None:
        line = await stream.readline()
        assert line, f"the daemon exited before listening: {log}"
        record = orjson.loads(line)
        log.append(record)
        if record.get("event") == "listening":
            fpolicy_port = int(record["port"])
        elif record.get("event") == "http_listening":
            http_port = int(record["port"])
    return fpolicy_port, http_port


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_image_entrypoint_serves_passes_its_healthcheck_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    bin_dir = await asyncio.to_thread(_install_fresh, tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = _container_environment(bin_dir, data_dir)
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    command = entrypoint_and_cmd(instructions)
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable == str(bin_dir / "fpolicyd"), "the entrypoint must resolve to the installed console script"

    process = await asyncio.create_subprocess_exec(
        executable,
        *command[1:],
        env=env,
        cwd=data_dir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    log: list[dict[str, Any]] = []
    try:
        _, http_port = await asyncio.wait_for(_wait_for_ports(process.stderr, log), 30)
        drain = asyncio.create_task(_drain_log(process.stderr, log))
        # The health check runs in the container's environment, where the HTTP port is a fixed number.
        probe_env = {**env, "FPOLICYD_HTTP_PORT": str(http_port)}
        healthcheck = healthcheck_command(instructions)
        ready = [*healthcheck, "--ready"]
        for _ in range(READINESS_ATTEMPTS):
            code, _ = await _run(ready, probe_env, data_dir)
            if code == 0:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"never ready: {await _run(ready, probe_env, data_dir)}")
        code, stderr = await _run(healthcheck, probe_env, data_dir)
        assert code == 0, stderr

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        await drain
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert any(record.get("event") == "signal" and record.get("signal") == "SIGTERM" for record in log)
    assert any(record.get("event") == "stopped" and record.get("failure") is None for record in log)
    assert any((data_dir / "spool").iterdir()), "the spool lives under FPOLICYD_DATA_DIR (the image's volume)"


async def _drain_log(stream: asyncio.StreamReader, log: list[dict[str, Any]]) -> None:
    while line := await stream.readline():
        log.append(orjson.loads(line))
