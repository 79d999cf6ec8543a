"""The deploys and node-init.sh agree: every metadata key a deploy sets is read, every key required is set.

What node-init.sh reads is observed, not guessed: it runs (--dry-run) against
the loopback metadata server, which records each attribute asked for; a key
is required when leaving it out makes the script name it and exit 2. What the
deploys set comes from Terraform's metadata blocks and from the gcloud calls
create.sh and dataproc-create-cluster.sh make against the fake gcloud (through
dataproc-init.sh, which hands DataProc's metadata over). The units' POLTERGUST_*
variables and flags must be ones the node (poltergust.settings) or the retire
loop reads. (Terraform's nodes.tf once set poltergust-backlog, which nothing read.)
"""
from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_fixtures.fake_metadata import FakeMetadata
from deploy_fixtures.gcloud_harness import FakeGcloud, find, make_release, metadata_of
from harness import ROOT
from harness.node_init import NODE_INIT, NODE_METADATA, RETIRE_UNIT, SCHEDULER_METADATA, run_init, unit_value

from poltergust.node import retire
from poltergust.settings import build_parser

MODULE = ROOT / "deploy" / "terraform" / "modules" / "poltergust"
FULL = {"node": {**NODE_METADATA, "poltergust-max-concurrent": "4", "poltergust-backlog-subscription": "backlog",
                 "poltergust-retire-after": "900", "poltergust-min-nodes": "0", "poltergust-secrets": "",
                 "poltergust-allowed-environment-prefix": "gs://my-bucket/env", "poltergust-run-as": "none",
                 "poltergust-env-cache-size": "10G", "poltergust-min-free-disk": "1G"},
        "scheduler": {**SCHEDULER_METADATA, "poltergust-path": "gs://my-bucket/pipeline"}}


def _dry_run(attributes: dict[str, str], tmp_path: Path) -> tuple[int, str, set[str]]:
    """node-init.sh against the fake metadata server: (exit status, stderr, attributes it asked for)."""
    fake = FakeMetadata(attributes, "metadata-project")
    try:
        env = {k: v for k, v in os.environ.items() if k != "POLTERGUST_METADATA_DIR"}
        result = subprocess.run(["bash", str(NODE_INIT), "--dry-run", "--root", str(tmp_path / "root")],
                                capture_output=True, text=True, timeout=60, env={**env, "GCE_METADATA_HOST": fake.host})
        asked = {path.rsplit("/", 1)[1] for path, _ in fake.requests if "/instance/attributes/" in path}
        return result.returncode, result.stderr, asked
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def init_reads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[str], set[str]]]:
    """Per role: (keys node-init.sh reads, keys it requires)."""
    found = {}
    for role, attributes in FULL.items():
        tmp = tmp_path_factory.mktemp(role)
        status, stderr, asked = _dry_run(attributes, tmp)
        assert status == 0, stderr
        def refused_without(key: str, attributes: dict[str, str] = attributes, tmp: Path = tmp) -> bool:
            status, stderr, _ = _dry_run({k: v for k, v in attributes.items() if k != key}, tmp / key)
            return status == 2 and f"metadata attribute {key}" in stderr

        keys = sorted(asked - {"poltergust-role"})
        with ThreadPoolExecutor(4) as pool:  # one dry run per key left out: side by side, each in its own root
            required = {key for key, refused in zip(keys, pool.map(refused_without, keys)) if refused}
        found[role] = (asked - {"poltergust-package"}, required | {"poltergust-role"})
    return found


def terraform_metadata(tf: str) -> set[str]:
    block = re.search(r"^  metadata = \{(.*?)^  \}", (MODULE / tf).read_text(), re.M | re.S)
    assert block, tf
    return set(re.findall(r"^\s*([a-z][a-z0-9-]*)\s*=", block.group(1), re.M))


@pytest.fixture(scope="module")
def deploy_metadata(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, set[str]]]:
    """Per deploy, per role: the metadata keys node-init.sh gets."""
    tmp = tmp_path_factory.mktemp("deploys")
    manifest = make_release(tmp / "dist")
    (tmp / "gcloud").mkdir()
    fake = FakeGcloud(tmp / "gcloud")
    done, calls = fake.run(ROOT / "deploy" / "gcloud" / "create.sh", "--project=my-proj", f"--release={manifest}")
    assert done.returncode == 0, done.stderr
    gcloud = {"node": set(metadata_of(find(calls, "instance-templates", "create"))),
              "scheduler": set(metadata_of(find(calls, "compute", "instances", "create")))}
    (tmp / "dataproc").mkdir()
    fake = FakeGcloud(tmp / "dataproc")
    done, calls = fake.run(ROOT / "clusters" / "dataproc-create-cluster.sh", "mycluster", "2",
                           env={"POLTERGUST_PROJECT": "my-proj", "POLTERGUST_RELEASE": str(manifest),
                                "POLTERGUST_NO_TUNNEL": "1"})
    assert done.returncode == 0, done.stderr
    cluster = metadata_of(find(calls, "dataproc", "clusters", "create"))
    return {"terraform": {"node": terraform_metadata("nodes.tf"), "scheduler": terraform_metadata("scheduler.tf")},
            "gcloud": gcloud,
            "dataproc": {role: dataproc_handover(cluster, dataproc_role, tmp / role)
                         for role, dataproc_role in (("node", "Worker"), ("scheduler", "Master"))}}


def dataproc_handover(cluster: dict[str, str], dataproc_role: str, tmp: Path) -> set[str]:
    """The keys clusters/dataproc-init.sh hands node-init.sh, given the cluster's metadata."""
    values = tmp / "values"
    values.mkdir(parents=True)
    for name, value in {**cluster, "dataproc-role": dataproc_role, "dataproc-master": "mycluster-m"}.items():
        (values / name).write_text(value)
    get_metadata, dump = tmp / "get_metadata_value", tmp / "dump.sh"
    get_metadata.write_text(f'#!/bin/sh\ncat "{values}/${{1#attributes/}}"\n')
    get_metadata.chmod(0o755)
    dump.write_text('ls "$POLTERGUST_METADATA_DIR/instance/attributes"\n')
    result = subprocess.run(["bash", str(ROOT / "clusters" / "dataproc-init.sh")], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "POLTERGUST_GET_METADATA": str(get_metadata),
                                             "POLTERGUST_NODE_INIT": str(dump)})
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def mismatches(deploy: str, set_keys: dict[str, set[str]], init_reads: dict) -> list[str]:
    problems = []
    for role, keys in set_keys.items():
        reads, required = init_reads[role]
        ours = {k for k in keys if k.startswith("poltergust-")}
        problems += [f"{deploy} {role}: sets {k}, which node-init.sh never reads" for k in sorted(ours - reads)]
        problems += [f"{deploy} {role}: does not set {k}, which node-init.sh requires"
                     for k in sorted(required - ours)]
    return problems


def test_node_init_reads_and_requires_what_its_header_says(init_reads: dict) -> None:
    reads, required = init_reads["node"]
    assert {"poltergust-backlog-subscription", "poltergust-retire-after", "poltergust-min-nodes"} <= reads
    assert required == {"poltergust-role", "poltergust-path", "poltergust-scheduler-url", "poltergust-wheel-url",
                        "poltergust-wheel-sha256", "poltergust-lock-url", "poltergust-lock-sha256"}
    header = NODE_INIT.read_text().split("set -euo pipefail")[0]
    for key in reads | init_reads["scheduler"][0]:
        assert key in header, f"node-init.sh reads {key} but its header does not document it"


@pytest.mark.parametrize("deploy", ["terraform", "gcloud", "dataproc"])
def test_every_deploy_sets_what_node_init_reads_and_needs(deploy: str, deploy_metadata: dict,
                                                          init_reads: dict) -> None:
    assert mismatches(deploy, deploy_metadata[deploy], init_reads) == []


def test_a_key_nobody_reads_is_found(deploy_metadata: dict, init_reads: dict) -> None:
    """Broken on purpose: Terraform's nodes as before issue 23 (poltergust-backlog)."""
    old = {**deploy_metadata["terraform"],
           "node": deploy_metadata["terraform"]["node"] - {"poltergust-backlog-subscription"} | {"poltergust-backlog"}}
    assert mismatches("terraform", old, init_reads) == [
        "terraform node: sets poltergust-backlog, which node-init.sh never reads"]
    without_path = {"scheduler": deploy_metadata["gcloud"]["scheduler"],
                    "node": deploy_metadata["gcloud"]["node"] - {"poltergust-path"}}
    assert mismatches("gcloud", without_path, init_reads) == [
        "gcloud node: does not set poltergust-path, which node-init.sh requires"]


def _flags(command: str) -> set[str]:
    return set(re.findall(r"(?<= )--[a-z][a-z0-9-]*", command))


def test_unit_variables_and_flags_are_ones_the_programs_read(tmp_path: Path) -> None:
    parser_flags = {option for action in build_parser()._actions for option in action.option_strings}
    node_variables = {"POLTERGUST_" + flag[2:].upper().replace("-", "_") for flag in parser_flags}
    result, root = run_init(tmp_path, FULL["node"])
    assert result.returncode == 0, result.stderr
    units = {path.name: path.read_text() for path in (root / "etc/systemd/system").iterdir()}
    node = units["poltergust-node.service"]
    variables = {value.strip('"').split("=", 1)[0] for value in unit_value(node, "Environment")}
    ours = {v for v in variables if v.startswith("POLTERGUST_")}
    assert ours >= {"POLTERGUST_MAX_CONCURRENT", "POLTERGUST_BACKLOG_SUBSCRIPTION", "POLTERGUST_DATA_DIR"}
    assert ours - node_variables == set(), "the node unit sets variables the node does not read"
    assert _flags(unit_value(node, "ExecStart")[0]) <= parser_flags
    retire_flags = {"--metrics-url", "--after", "--min-nodes", "--interval"}
    assert _flags(unit_value(units[Path(RETIRE_UNIT).name], "ExecStart")[0]) <= retire_flags
    assert all(f"--{name}" in retire_flags for name in ("metrics-url", "after", "min-nodes"))
    assert retire.__name__ in unit_value(units[Path(RETIRE_UNIT).name], "ExecStart")[0]
