"""deploy/node-init.sh run dry: its metadata read from a directory, its files written under a root.

Shared by the init script's own tests and the deploy consistency checks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from harness.servers import ROOT

NODE_INIT = ROOT / "deploy" / "node-init.sh"
CLUSTERS = ROOT / "clusters"

RELEASE_METADATA = {
    "poltergust-wheel-url": "gs://my-bucket/_poltergust/dist/0.1.0-abc/poltergust-0.1.0-py3-none-any.whl",
    "poltergust-wheel-sha256": "a" * 64,
    "poltergust-lock-url": "gs://my-bucket/_poltergust/dist/0.1.0-abc/requirements.lock",
    "poltergust-lock-sha256": "b" * 64,
}
RELEASE = "/opt/poltergust/releases/" + hashlib.sha256(f"{'a' * 64} {'b' * 64}".encode()).hexdigest()[:16]
NODE_METADATA = {
    "poltergust-role": "node",
    **RELEASE_METADATA,
    "poltergust-path": "gs://my-bucket/pipeline",
    "poltergust-scheduler-url": "http://10.42.0.2:8082",
    "poltergust-topic": "poltergust-my-bucket",
    "poltergust-project": "my-project",
}
NODE_UNIT = "etc/systemd/system/poltergust-node.service"
LUIGID_UNIT = "etc/systemd/system/poltergust-luigid.service"
DASHBOARD_UNIT = "etc/systemd/system/poltergust-dashboard.service"
RETIRE_UNIT = "etc/systemd/system/poltergust-retire.service"
SCHEDULER_METADATA = {"poltergust-role": "scheduler", **RELEASE_METADATA}
# A dry run installs no release: the metadata is checked with this python's poltergust (the checkout's).
DRY_RUN_ENV = {"POLTERGUST_DRY_RUN_PYTHON": sys.executable}


def run_init(tmp_path: Path, attributes: dict[str, str], project_id: str | None = "metadata-project",
             script: Path = NODE_INIT, instance: dict[str, str] | None = None,
             ) -> tuple[subprocess.CompletedProcess[str], Path]:
    metadata = tmp_path / "metadata"
    shutil.rmtree(metadata, ignore_errors=True)
    (metadata / "instance" / "attributes").mkdir(parents=True)
    for key, value in (instance or {}).items():  # other instance/ keys, such as network-interfaces/0/ip
        (metadata / "instance" / key).parent.mkdir(parents=True, exist_ok=True)
        (metadata / "instance" / key).write_text(value + "\n")
    for name, value in attributes.items():
        (metadata / "instance" / "attributes" / name).write_text(value + "\n")
    if project_id is not None:
        (metadata / "project").mkdir()
        (metadata / "project" / "project-id").write_text(project_id)
    root = tmp_path / "root"
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, **DRY_RUN_ENV, "POLTERGUST_METADATA_DIR": str(metadata)}
    result = subprocess.run(["bash", str(script), "--dry-run", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
    return result, root


def unit_value(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(key + "=")]
