"""deploy/node-init.sh without a VM: its units (from --dry-run, metadata from a directory) and their hardening.

The real boot (install, units, start) is tests/test_boot.py; these check what
the script writes for each setting, that bad metadata is named before anything
is written, the scores `systemd-analyze security --offline` gives the units
(recorded in deploy/README.md), and how clusters/dataproc-init.sh hands
DataProc's metadata over.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import ROOT
from harness.node_init import (
    CLUSTERS,
    DASHBOARD_UNIT,
    DRY_RUN_ENV,
    LUIGID_UNIT,
    NODE_INIT,
    NODE_METADATA,
    NODE_UNIT,
    RELEASE,
    RELEASE_METADATA,
    RETIRE_UNIT,
    SCHEDULER_METADATA,
    run_init,
    unit_value,
)

pytestmark = pytest.mark.deploy

def test_node_unit_runs_the_release_with_the_metadata_values(tmp_path: Path) -> None:
    result, root = run_init(tmp_path, NODE_METADATA)
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    exec_start = unit_value(unit, "ExecStart")
    assert len(exec_start) == 1
    assert exec_start[0].startswith(
        f"{RELEASE}/venv/bin/python -P -m poltergust.async_worker --path gs://my-bucket/pipeline "
        "--scheduler-url http://10.42.0.2:8082 --topic poltergust-my-bucket --project my-project "
        "--http-host 0.0.0.0 --http-port 8080 --env-cache-size ")
    # Both sizes come from the disk under the state directory.
    cache, free = re.search(r"--env-cache-size (\d+)M --min-free-disk (\d+)M --run-as poltergust-run --run-as-pool 4$",
                            exec_start[0]).groups()
    disk_mib = shutil.disk_usage(root).total // 2**20
    assert abs(int(cache) - disk_mib // 2) <= 1 and 1024 <= int(free) <= 5120
    assert unit_value(unit, "WorkingDirectory") == [RELEASE]
    assert unit_value(unit, "EnvironmentFile") == [] and unit_value(unit, "LoadCredential") == []
    assert "--secret" not in exec_start[0]
    assert unit_value(unit, "Restart") == ["on-failure"]
    assert unit_value(unit, "KillSignal") == ["SIGTERM"]
    # Longer than the node's graceful shutdown (~10 s).
    assert int(unit_value(unit, "TimeoutStopSec")[0]) >= 30
    # Root, so that each run starts as poltergust-run; its HOME (pip's cache) is private.
    assert unit_value(unit, "User") == [] and unit_value(unit, "DynamicUser") == []
    assert unit_value(unit, "Environment")[0] == "HOME=/var/cache/poltergust"
    assert unit_value(unit, "CacheDirectory") == ["poltergust"]
    assert "WantedBy=multi-user.target" in unit
    assert not (root / LUIGID_UNIT).exists()
    # Dry-run: nothing installed, systemctl only announced.
    assert "would run: systemctl enable poltergust-node.service" in result.stderr
    assert f"would install {RELEASE_METADATA['poltergust-wheel-url']} (sha256 {'a' * 64})" in result.stderr


def test_an_idle_node_retires_only_with_the_setting(tmp_path: Path) -> None:
    """poltergust-retire-after starts poltergust.node.retire on the node's own /metrics; without it, nothing."""
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-retire-after": "900",
                                       "poltergust-min-nodes": "2"})
    assert result.returncode == 0, result.stderr
    unit = (root / RETIRE_UNIT).read_text()
    assert unit_value(unit, "ExecStart") == [
        f"{RELEASE}/venv/bin/python -P -m poltergust.node.retire --metrics-url http://127.0.0.1:8080/metrics "
        "--after 900 --min-nodes 2"]
    assert "--http-port 8080 " in unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    assert unit_value(unit, "DynamicUser") == ["yes"]
    assert "would run: systemctl restart poltergust-retire.service" in result.stderr
    # A later boot without the setting (or with 0) removes it.
    metadata = tmp_path / "metadata"
    for value in ("0", None):
        attribute = metadata / "instance" / "attributes" / "poltergust-retire-after"
        attribute.write_text(value) if value else attribute.unlink()
        (root / RETIRE_UNIT).write_text("[Service]\n")
        again = subprocess.run(["bash", str(NODE_INIT), "--dry-run", "--root", str(root)], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "POLTERGUST_METADATA_DIR": str(metadata)})
        assert again.returncode == 0, again.stderr
        assert "would run: systemctl disable --now poltergust-retire.service" in again.stderr
        assert not (root / RETIRE_UNIT).exists()


def test_node_defaults_come_from_the_path_and_the_project_metadata(tmp_path: Path) -> None:
    attributes = {k: v for k, v in NODE_METADATA.items() if k not in ("poltergust-topic", "poltergust-project")}
    result, root = run_init(tmp_path, attributes, project_id="metadata-project")
    assert result.returncode == 0, result.stderr
    exec_start = unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    assert " --scheduler-url http://10.42.0.2:8082 --project metadata-project " in exec_start
    # The topic is the node's own default (not repeated here), which the release's check reports.
    assert "--topic" not in exec_start
    assert "metadata checked: the node watches gs://my-bucket/pipeline with luigid http://10.42.0.2:8082, " \
           "topic poltergust-my-bucket, project metadata-project" in result.stderr


def test_node_takes_several_paths_and_optional_settings(tmp_path: Path) -> None:
    attributes = {**NODE_METADATA, "poltergust-path": "gs://my-bucket/pipeline gs://other-bucket/jobs",
                  "poltergust-max-concurrent": "2", "poltergust-env-cache-size": "20G",
                  "poltergust-backlog-subscription": "poltergust-backlog",
                  "poltergust-min-free-disk": "3G", "poltergust-secrets": "TOKEN=gh-token DB=projects/p-1/secrets/db"}
    result, root = run_init(tmp_path, attributes)
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    assert "--path gs://my-bucket/pipeline --path gs://other-bucket/jobs --scheduler-url" in unit
    assert unit_value(unit, "ExecStart")[0].endswith(" --env-cache-size 20G --min-free-disk 3G --run-as poltergust-run "
                                                            "--run-as-pool 4")
    assert "Environment=POLTERGUST_MAX_CONCURRENT=2" in unit
    assert "Environment=POLTERGUST_BACKLOG_SUBSCRIPTION=poltergust-backlog" in unit
    assert "would read projects/my-project/secrets/gh-token/versions/latest into /etc/poltergust/node.secrets as " \
        "TOKEN" in result.stderr
    assert "would read projects/p-1/secrets/db/versions/latest" in result.stderr


@pytest.mark.parametrize("value", ["none", ""])
def test_run_as_none_keeps_the_unprivileged_node(tmp_path: Path, value: str) -> None:
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-run-as": value})
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    assert unit_value(unit, "User") == ["poltergust"] and unit_value(unit, "Group") == ["poltergust"]
    assert "--run-as" not in unit_value(unit, "ExecStart")[0]
    assert unit_value(unit, "Environment")[0] == "HOME=/var/lib/poltergust"
    assert unit_value(unit, "PrivateUsers") == ["yes"] and unit_value(unit, "CapabilityBoundingSet") == [""]


def test_run_as_names_another_pipeline_user(tmp_path: Path) -> None:
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-run-as": "pipelines"})
    assert result.returncode == 0, result.stderr
    assert unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0].endswith(" --run-as pipelines --run-as-pool 4")


def test_exec_start_quotes_unusual_values_for_systemd(tmp_path: Path) -> None:
    attributes = {**NODE_METADATA, "poltergust-path": 'gs://my-bucket/pipe$HOME%n"x\\y'}
    result, root = run_init(tmp_path, attributes)
    assert result.returncode == 0, result.stderr
    exec_start = unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    # Double quotes; $ and % doubled so systemd expands neither; \ and " escaped.
    assert ' --path "gs://my-bucket/pipe$$HOME%%n\\"x\\\\y" --scheduler-url ' in exec_start


def test_scheduler_role_gets_luigid_and_no_node(tmp_path: Path) -> None:
    result, root = run_init(tmp_path, SCHEDULER_METADATA)
    assert result.returncode == 0, result.stderr
    assert not (root / NODE_UNIT).exists()
    # Without poltergust-path: no dashboard, and the log says so.
    assert not (root / DASHBOARD_UNIT).exists()
    assert "no poltergust-path in the metadata: not running the dashboard" in result.stderr
    assert "poltergust-dashboard.service" not in result.stderr
    unit = (root / LUIGID_UNIT).read_text()
    assert unit_value(unit, "ExecStart") == [
        f"{RELEASE}/venv/bin/python -P -m poltergust.luigid --port 8082 --address 0.0.0.0 "
        "--state-path /var/lib/poltergust-luigid/state.pickle"], "no names but loopback known: luigid's default"
    assert unit_value(unit, "DynamicUser") == ["yes"]
    assert unit_value(unit, "Environment").count("LUIGI_CONFIG_PATH=/etc/poltergust/luigi.cfg") == 1
    # luigid's configuration is checked and merged by the release, which a dry run does not install (the real
    # file: test_boot.py; its content: test_luigid_configuration.py).
    assert (f"would run: {root}{RELEASE}/venv/bin/python -P -m poltergust.luigid.configuration merge "
            in result.stderr)
    assert not (root / "etc/poltergust/luigi.cfg").exists()
    assert "would run: systemctl enable poltergust-luigid.service" in result.stderr


def test_luigid_answers_the_names_nodes_reach_it_by_and_no_other(tmp_path: Path) -> None:
    """Nodes use the scheduler's internal address (or DNS name); luigid refuses other Host names (guard)."""
    result, root = run_init(tmp_path, SCHEDULER_METADATA, instance={
        "network-interfaces/0/ip": "10.42.0.2", "hostname": "sched.europe-west1-b.c.my-project.internal"})
    assert result.returncode == 0, result.stderr
    assert unit_value((root / LUIGID_UNIT).read_text(), "ExecStart")[0].endswith(
        "--state-path /var/lib/poltergust-luigid/state.pickle --allowed-host 10.42.0.2 "
        "--allowed-host sched.europe-west1-b.c.my-project.internal --allowed-host sched")


def test_every_installed_secret_is_a_secret_env_read_from_a_credential(tmp_path: Path) -> None:
    """Secret Manager values never sit in the node's environment: a credential file, each name --secret-env."""
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-secrets": "GH_PAT=gh-pat PYPI_PASS=pypi"})
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    exec_start = unit_value(unit, "ExecStart")[0]
    assert " --secret-env GH_PAT --secret-env PYPI_PASS --secrets-file %d/node-secrets --env-cache-size " \
        in exec_start
    assert unit_value(unit, "LoadCredential") == ["node-secrets:/etc/poltergust/node.secrets"]
    assert unit_value(unit, "EnvironmentFile") == []
    assert "would read projects/my-project/secrets/pypi/versions/latest into /etc/poltergust/node.secrets as " \
        "PYPI_PASS" in result.stderr


def test_scheduler_with_a_path_runs_the_dashboard_on_loopback(tmp_path: Path) -> None:
    paths = "gs://my-bucket/pipeline gs://other-bucket/jobs"
    result, root = run_init(tmp_path, {**SCHEDULER_METADATA, "poltergust-path": paths})
    assert result.returncode == 0, result.stderr
    assert (root / LUIGID_UNIT).exists() and not (root / NODE_UNIT).exists()
    unit = (root / DASHBOARD_UNIT).read_text()
    assert unit_value(unit, "ExecStart") == [
        f"{RELEASE}/venv/bin/python -P -m poltergust.cli dashboard --path gs://my-bucket/pipeline "
        "--path gs://other-bucket/jobs --scheduler-url http://127.0.0.1:8082 --host 127.0.0.1 --port 8090"]
    assert unit_value(unit, "DynamicUser") == ["yes"] and unit_value(unit, "User") == []
    assert unit_value(unit, "WorkingDirectory") == [RELEASE]
    # Read-only: no state of its own, nothing writable.
    assert unit_value(unit, "StateDirectory") == [] and unit_value(unit, "ReadWritePaths") == []
    assert "After=network-online.target poltergust-luigid.service" in unit
    assert "would run: systemctl enable poltergust-dashboard.service" in result.stderr
    assert "would run: systemctl restart poltergust-dashboard.service" in result.stderr


def test_a_scheduler_whose_path_is_gone_drops_the_dashboard(tmp_path: Path) -> None:
    metadata = tmp_path / "metadata"
    (metadata / "instance" / "attributes").mkdir(parents=True)
    for name, value in SCHEDULER_METADATA.items():
        (metadata / "instance" / "attributes" / name).write_text(value)
    root = tmp_path / "root"
    (root / DASHBOARD_UNIT).parent.mkdir(parents=True)
    (root / DASHBOARD_UNIT).write_text("[Service]\n")  # from an earlier boot
    result = subprocess.run(["bash", str(NODE_INIT), "--dry-run", "--root", str(root)], capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, **DRY_RUN_ENV, "POLTERGUST_METADATA_DIR": str(metadata)})
    assert result.returncode == 0, result.stderr
    assert "would run: systemctl disable --now poltergust-dashboard.service" in result.stderr
    assert not (root / DASHBOARD_UNIT).exists()


CHECKED_BEFORE_PYTHON = {"poltergust-role", "poltergust-wheel-url", "poltergust-wheel-sha256", "poltergust-lock-url",
                         "poltergust-lock-sha256", "poltergust-package",
                         "poltergust-retire-after", "poltergust-min-nodes"}  # still checked by the script itself


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        ({"poltergust-path": None}, "poltergust-path"),
        ({"poltergust-path": "s3://my-bucket/pipeline"}, "poltergust-path"),
        ({"poltergust-path": "/data/pipeline"}, "poltergust-path"),
        ({"poltergust-scheduler-url": None}, "poltergust-scheduler-url"),
        ({"poltergust-scheduler-url": "localhost:8082"}, "poltergust-scheduler-url"),
        ({"poltergust-role": None}, "poltergust-role"),
        ({"poltergust-role": "worker"}, "poltergust-role"),
        ({"poltergust-topic": "bad topic!"}, "poltergust-topic"),
        ({"poltergust-project": None, "project-id": None}, "poltergust-project"),
        ({"poltergust-package": "poltergust==1.2.3"}, "poltergust-package"),
        ({"poltergust-max-concurrent": "many"}, "poltergust-max-concurrent"),
        ({"poltergust-backlog-subscription": "bad name; rm"}, "poltergust-backlog-subscription"),
        ({"poltergust-retire-after": "15m"}, "poltergust-retire-after"),
        ({"poltergust-min-nodes": "-1"}, "poltergust-min-nodes"),
        ({"poltergust-wheel-url": None}, "poltergust-wheel-url"),
        ({"poltergust-wheel-url": "http://example.invalid/poltergust-0.1.0-py3-none-any.whl"},
         "poltergust-wheel-url"),
        ({"poltergust-wheel-url": "gs://my-bucket/dist/poltergust.tar.gz"}, "poltergust-wheel-url"),
        ({"poltergust-wheel-sha256": "abc"}, "poltergust-wheel-sha256"),
        ({"poltergust-lock-url": None}, "poltergust-lock-url"),
        ({"poltergust-lock-sha256": None}, "poltergust-lock-sha256"),
        ({"poltergust-secrets": "TOKEN"}, "poltergust-secrets"),
        ({"poltergust-secrets": "TOKEN=a/b"}, "poltergust-secrets"),
        ({"poltergust-env-cache-size": "lots"}, "poltergust-env-cache-size"),
        ({"poltergust-run-as": "root"}, "poltergust-run-as"),
        ({"poltergust-run-as": "poltergust"}, "poltergust-run-as"),
        ({"poltergust-run-as": "Bad User"}, "poltergust-run-as"),
        ({"poltergust-role": "scheduler", "poltergust-path": "s3://my-bucket/pipeline"}, "poltergust-path"),
        ({"poltergust-max-concurrent": "0"}, "poltergust-max-concurrent"),
        ({"poltergust-min-free-disk": "lots"}, "poltergust-min-free-disk"),
        ({"poltergust-allowed-environment-prefix": "gs://my-bucket/envs /etc"},
         "poltergust-allowed-environment-prefix"),
        ({"poltergust-topic": "poltergust-my-bucket\nExecStartPre=/bin/sh"}, "poltergust-topic"),
        ({"poltergust-role": "bake", "poltergust-bake-environments": "/etc/passwd"}, "poltergust-bake-environments"),
    ],
)
def test_bad_or_missing_metadata_is_named(tmp_path: Path, change: dict, attribute: str) -> None:
    attributes = dict(NODE_METADATA)
    project_id: str | None = "metadata-project"
    for name, value in change.items():
        if name == "project-id":
            project_id = None
        elif value is None:
            attributes.pop(name, None)
        else:
            attributes[name] = value
    result, root = run_init(tmp_path, attributes, project_id=project_id)
    assert result.returncode == 2, result.stderr
    assert f"metadata attribute {attribute}" in result.stderr
    # What the script needs to install the release it checks before; the release checks the rest.
    before_python = attribute in CHECKED_BEFORE_PYTHON
    assert ("would install" in result.stderr) is not before_python
    assert ("check-metadata: metadata attribute" in result.stderr) is not before_python
    # Nothing half-done: settings are checked before any unit, user or secret is written or started.
    assert not (root / "etc").exists()
    assert "would run" not in result.stderr and "would read" not in result.stderr
    assert "not creating the system user" not in result.stderr


def test_the_release_checks_metadata_with_the_nodes_own_declarations(tmp_path: Path) -> None:
    """Every problem at once; a value the node's flag refuses gets the node's own words."""
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-max-concurrent": "many",
                                       "poltergust-env-cache-size": "lots", "poltergust-topic": "bad topic!"})
    assert result.returncode == 2, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("check-metadata:")] == [
        "check-metadata: metadata attribute poltergust-topic: 'bad topic!' is not a valid Pub/Sub topic name",
        "check-metadata: metadata attribute poltergust-max-concurrent: invalid int value: 'many'",
        "check-metadata: metadata attribute poltergust-env-cache-size: 'lots': expected a size such as 500M, 10G "
        "or a number of bytes",
    ]
    assert not (root / "etc").exists()


def test_init_script_help_and_bad_arguments() -> None:
    result = subprocess.run(["bash", str(NODE_INIT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "poltergust-wheel-sha256" in result.stdout
    result = subprocess.run(["bash", str(NODE_INIT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "--bogus" in result.stderr


# ---------------------------------------------------------------------------
# Hardening of the units

HARDENING = {
    "UMask": "0027", "StateDirectoryMode": "0750", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "ProtectProc": "invisible", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
    "PrivateUsers": "yes",
}
RUN_AS_HARDENING = {
    **{k: v for k, v in HARDENING.items() if k != "PrivateUsers"},
    # The pipelines' user runs the cached environments: readable, traversable, not listable.
    "UMask": "0022", "StateDirectoryMode": "0711", "CacheDirectoryMode": "0700",
    # bubblewrap makes each run's sandbox: a PID namespace, its own /proc (mounted), IPC of its own.
    "CapabilityBoundingSet": "CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL CAP_DAC_OVERRIDE CAP_FOWNER CAP_SYS_ADMIN",
    "RestrictNamespaces": "pid mnt ipc",
}
UNITS = {
    # README row label: (metadata, unit, hardening, highest acceptable score)
    # The root node keeps CAP_SYS_ADMIN and three namespaces to sandbox each run and build (2.6 without them).
    "`poltergust-node.service`, `--run-as` (default)": (NODE_METADATA, NODE_UNIT, RUN_AS_HARDENING, 3.5),
    "`poltergust-node.service`, `poltergust-run-as=none`": (
        {**NODE_METADATA, "poltergust-run-as": "none"}, NODE_UNIT, HARDENING, 2.0),
    "`poltergust-luigid.service`": (SCHEDULER_METADATA, LUIGID_UNIT, HARDENING, 2.0),
    "`poltergust-dashboard.service`": (
        {**SCHEDULER_METADATA, "poltergust-path": "gs://my-bucket/pipeline"}, DASHBOARD_UNIT, HARDENING, 2.0),
    "`poltergust-retire.service`": (
        {**NODE_METADATA, "poltergust-retire-after": "900"}, RETIRE_UNIT, HARDENING, 2.0),
}


def security_score(unit: Path) -> float:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd (tests/run.sh does)")
    result = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                            timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("label", list(UNITS))
def test_units_are_locked_down_and_scored(tmp_path: Path, label: str) -> None:
    """Unprivileged units score 2.0 or better; the node that switches users runs as root and scores 3.5 or better."""
    attributes, unit_path, hardening, highest = UNITS[label]
    result, root = run_init(tmp_path, attributes)
    assert result.returncode == 0, result.stderr
    unit = (root / unit_path).read_text()
    for key, value in hardening.items():
        assert unit_value(unit, key) == [value], key
    if hardening is RUN_AS_HARDENING:
        assert unit_value(unit, "PrivateUsers") == [], "poltergust-run must exist in the node's user namespace"
        hidden = unit_value(unit, "InaccessiblePaths")[0].split()
        assert {"-/etc/shadow", "-/etc/ssh"} <= set(hidden)
    memory_max, tasks_max = unit_value(unit, "MemoryMax")[0], unit_value(unit, "TasksMax")[0]
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert memory_max.endswith("M") and total_mib * 0.8 <= int(memory_max[:-1]) < total_mib
    assert int(tasks_max) >= 1024 * (os.cpu_count() or 1)
    assert unit_value(unit, "WorkingDirectory") == [RELEASE]
    score = security_score(root / unit_path)
    assert score <= highest, f"{label}: systemd-analyze security scores {score}"
    # Every directive is one this systemd knows (only the release's python is missing here).
    verify = subprocess.run(["systemd-analyze", "verify", str(root / unit_path)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (verify.stdout + verify.stderr).splitlines()
                if "is not executable" not in line and "sysinit.target" not in line]
    assert problems == []
    readme = (ROOT / "deploy" / "README.md").read_text()
    recorded = re.search(rf"^\| {re.escape(label)} \| (\d+\.\d+) \|", readme, re.M)
    assert recorded and float(recorded.group(1)) == score, "deploy/README.md records the score measured here"


# ---------------------------------------------------------------------------
# DataProc: clusters/dataproc-init.sh hands its metadata to node-init.sh


def fake_get_metadata(tmp_path: Path, values: dict[str, str]) -> Path:
    """A stand-in for DataProc's get_metadata_value: `attributes/NAME` -> value."""
    directory = tmp_path / "dataproc-metadata"
    directory.mkdir()
    for name, value in values.items():
        (directory / name).write_text(value)
    script = tmp_path / "get_metadata_value"
    script.write_text(f'#!/bin/sh\ncat "{directory}/${{1#attributes/}}"\n')
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(("dataproc_role", "units"), [("Master", [DASHBOARD_UNIT, LUIGID_UNIT]),
                                                      ("Worker", [NODE_UNIT])])
def test_dataproc_init_maps_roles_onto_node_init(tmp_path: Path, dataproc_role: str, units: list[str]) -> None:
    get_metadata = fake_get_metadata(tmp_path, {
        "dataproc-role": dataproc_role, "dataproc-master": "mycluster-m", **RELEASE_METADATA,
        "poltergust-path": "gs://mycluster/pipeline", "poltergust-topic": "poltergust-mycluster",
        "poltergust-project": "my-proj",
    })
    root = tmp_path / "root"
    env = {**os.environ, **DRY_RUN_ENV, "POLTERGUST_GET_METADATA": str(get_metadata),
           "POLTERGUST_NODE_INIT": str(NODE_INIT)}
    result = subprocess.run(["bash", str(CLUSTERS / "dataproc-init.sh"), "--dry-run", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    # The master gets the path too, so it also runs the dashboard.
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == [Path(u).name for u in units]
    assert f"would install {RELEASE_METADATA['poltergust-wheel-url']}" in result.stderr
    if dataproc_role == "Worker":
        assert unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0].startswith(
            f"{RELEASE}/venv/bin/python -P -m poltergust.async_worker --path gs://mycluster/pipeline "
            "--scheduler-url http://mycluster-m:8082 --topic poltergust-mycluster --project my-proj ")


NETNS_PROBE = r"""
import encodings.idna, json, os, socket, subprocess, sys  # (idna: imported while still root)
rules, uid = sys.argv[1], int(sys.argv[2])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"], check=True)
subprocess.run(["nft", "-f", rules], check=True)
subprocess.run(["nft", "-f", rules], check=True)  # again, as on every boot
servers = [socket.create_server((host, 80)) for host in ("169.254.169.254", "127.0.0.1")]

def reaches(host):
    try:
        socket.create_connection((host, 80), timeout=5).close()
        return True
    except OSError:
        return False

read, write = os.pipe()
if os.fork() == 0:
    try:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
        os.write(write, json.dumps({h: reaches(h) for h in ("169.254.169.254", "127.0.0.1")}).encode())
    finally:
        os._exit(0)
os.wait()
print(json.dumps({"run user": json.loads(os.read(read, 1000)), "node": reaches("169.254.169.254")}))
"""


def test_runs_cannot_reach_the_metadata_server(tmp_path: Path) -> None:
    """The rule for the pipelines' user, rendered, and loaded in a network namespace of its own when possible."""
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-run-as": "nobody"})
    assert result.returncode == 0, result.stderr
    rules = (root / "etc/poltergust/runs.nft").read_text()
    assert "meta skuid 65534 ip daddr 169.254.169.254 counter reject" in rules
    assert "meta skuid 65534 ip6 daddr fd20:ce::254 counter reject" in rules
    assert "--root: not loading /etc/poltergust/runs.nft" in result.stderr
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-run-as": "none"})
    assert not (root / "etc/poltergust/runs.nft").exists()
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"):
        pytest.skip("loading the rule needs root, nft (Debian package nftables) and unshare")
    (tmp_path / "runs.nft").write_text(rules)
    probe = subprocess.run(["unshare", "--net", "python3", "-c", NETNS_PROBE, str(tmp_path / "runs.nft"), "65534"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"run user": {"169.254.169.254": False, "127.0.0.1": True}, "node": True}


def test_a_pipeline_service_account_in_metadata_becomes_the_flag(tmp_path: Path) -> None:
    email = "pipelines@my-project.iam.gserviceaccount.com"
    result, root = run_init(tmp_path, {**NODE_METADATA, "poltergust-pipeline-service-account": email})
    assert result.returncode == 0, result.stderr
    assert f" --pipeline-service-account {email} --env-cache-size " in \
        unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    result, _ = run_init(tmp_path, {**NODE_METADATA, "poltergust-pipeline-service-account": "me@example.com"})
    assert result.returncode == 2 and "poltergust-pipeline-service-account" in result.stderr
