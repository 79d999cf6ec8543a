"""The permission audit (tests/permission_audit.py, deploy/permissions.yaml) on the real stack and every deploy.

A node with its backlog and the dashboard run through recording proxies in
front of the GCS emulator; every request they make, every Pub/Sub call in the
code and the static calls of node-init.sh and the retire loop must have a row
in deploy/permissions.yaml, and each deploy must grant each identity every
permission those rows name. Custom roles must hold nothing unneeded; what the
predefined roles bring beyond the calls is printed.
"""
from __future__ import annotations

import os
import urllib.request
import uuid
from pathlib import Path

import pytest
from deploy_fixtures.gcloud_harness import FakeGcloud, make_release
from harness import ROOT, Dashboard, GatedProxy, result, submit, wait_for
from permission_audit import (
    MODULE,
    Grant,
    Needs,
    audit,
    gcloud_grants,
    needs,
    pubsub_calls,
    role_permissions,
    storage_row,
    terraform_grants,
)

CREATE = ROOT / "deploy" / "gcloud" / "create.sh"
DATAPROC = ROOT / "clusters" / "dataproc-create-cluster.sh"


@pytest.fixture
def backend() -> str:
    return "gcs"


@pytest.fixture(scope="module")
def deploys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Grant], dict[str, list[str]]]]:
    """The grants of each deploy: Terraform's resources, and what the gcloud scripts granted against the fake."""
    tmp = tmp_path_factory.mktemp("deploys")
    manifest = make_release(tmp / "dist")
    (tmp / "gcloud").mkdir()
    (tmp / "dataproc").mkdir()
    fake = FakeGcloud(tmp / "gcloud")
    done, calls = fake.run(CREATE, "--project=my-proj", "--bucket=my-bucket", f"--release={manifest}",
                           "--secret=TOKEN=a-token")
    assert done.returncode == 0, done.stderr
    gcloud = gcloud_grants(calls, {"poltergust-node": "node", "poltergust-scheduler": "scheduler"})
    fake = FakeGcloud(tmp / "dataproc")
    done, calls = fake.run(DATAPROC, "mycluster", "2", env={"POLTERGUST_PROJECT": "my-proj",
                                                             "POLTERGUST_RELEASE": str(manifest),
                                                             "POLTERGUST_NO_TUNNEL": "1"})
    assert done.returncode == 0, done.stderr
    dataproc = gcloud_grants(calls, {"poltergust-mycluster": "cluster"})
    return {"terraform": terraform_grants(), "gcloud": gcloud, "dataproc": dataproc}


@pytest.fixture(scope="module")
def recorded(request: pytest.FixtureRequest) -> dict[str, list[tuple[str, str]]]:
    """Filled by the real-stack test; the audits below run after it (same module)."""
    return {}


def test_a_node_with_its_backlog_and_the_dashboard_make_only_known_calls(
    start_node, bucket, luigid, gcs, environment_yaml: str, tmp_path: Path, recorded: dict,
) -> None:
    calls: dict[str, list[tuple[str, str]]] = {"node": [], "dashboard": []}
    proxies = {who: GatedProxy(gcs.url, lambda method, path, body, who=who: calls[who].append((method, path)))
               for who in calls}
    try:
        node = start_node("node-a", "--backlog-subscription", f"backlog-{uuid.uuid4().hex[:8]}",
                          env_overrides={"STORAGE_EMULATOR_HOST": proxies["node"].url})
        submit(bucket, "audited", {"name": "Touch", "module": "poltergust_testpipes",
                                   "out-dir": str(tmp_path / "out")}, environment_yaml)
        assert result(bucket, "audited", "done")["poltergust"]["node"] == "node-a"
        wait_for(lambda: not bucket.exists("pipeline/audited.config.yaml"), 30, "the node to remove the config")
        dashboard = Dashboard(tmp_path, bucket.url("pipeline"),
                              {**os.environ, "STORAGE_EMULATOR_HOST": proxies["dashboard"].url},
                              "--scheduler-url", luigid.url)
        try:
            for page in ("/", "/nodes", "/pipeline?name=audited"):
                with urllib.request.urlopen(dashboard.url + page, timeout=60) as response:
                    assert response.status == 200
        finally:
            dashboard.stop()
        assert node.stop() == 0
    finally:
        for proxy in proxies.values():
            proxy.close()
    assert calls["node"] and calls["dashboard"]
    unknown = [f"{who} {method} {path}" for who, made in calls.items() for method, path in made
               if storage_row(method, path) is None]
    assert unknown == [], "storage calls without a row in deploy/permissions.yaml"
    recorded.update(calls)


def test_pubsub_calls_in_the_code_all_have_rows() -> None:
    found = pubsub_calls()
    assert "pubsub publish" in found["node"] and "pubsub subscribe" in found["node"]
    assert "dashboard" not in found, "the dashboard's account has no Pub/Sub grant"
    need = needs({})
    assert need.unknown == [], "Pub/Sub calls without a row in deploy/permissions.yaml"


def _needs(recorded: dict) -> Needs:
    if not recorded:
        pytest.skip("needs the recorded calls of the real-stack test in this module")
    need = needs(recorded)
    assert need.unknown == []
    return need


@pytest.mark.parametrize("deploy", ["terraform", "gcloud", "dataproc"])
def test_every_deploy_grants_every_permission_the_calls_need(deploy: str, deploys: dict, recorded: dict) -> None:
    report = audit(deploy, _needs(recorded), *deploys[deploy])
    assert report.missing == []
    assert report.unused_custom == [], "custom roles must hold only what a call needs"
    print(f"\n{deploy}: granted by predefined roles but needed by no call:\n  " +
          "\n  ".join(report.unused_predefined))


@pytest.mark.parametrize("deploy", ["terraform", "gcloud", "dataproc"])
def test_calls_for_help_are_granted_on_the_topic_only(deploy: str, deploys: dict) -> None:
    grants, custom = deploys[deploy]
    publishing = [g for g in grants if g.identity in ("node", "cluster")
                  and "pubsub.topics.publish" in role_permissions(g.role, custom)]
    assert [(g.role, g.scope) for g in publishing] == [("roles/pubsub.publisher", "topic")]


def test_the_audit_fails_without_the_publish_grant(deploys: dict, recorded: dict) -> None:
    """Broken on purpose: Terraform without the topic-level publisher grant (as before issue 23)."""
    need = _needs(recorded)
    grants, custom = terraform_grants(MODULE, drop="node_publishes_help")
    missing = audit("terraform", need, grants, custom).missing
    assert len(missing) == 1 and missing[0].startswith("terraform node: pubsub.topics.publish (needed by node"), \
        missing
    grants, custom = deploys["gcloud"]
    without = [g for g in grants if not (g.identity == "node" and g.role == "roles/pubsub.publisher")]
    assert [m.split(" (")[0] for m in audit("gcloud", need, without, custom).missing] == \
        ["gcloud node: pubsub.topics.publish"]
    # And a custom role holding more than the calls need fails the other way.
    custom = {**custom, "projects/my-proj/roles/poltergust_node_retires": [
        "compute.instanceGroupManagers.get", "compute.instanceGroupManagers.update", "compute.instances.delete"]}
    assert [u.split(" (")[0] for u in audit("gcloud", need, grants, custom).unused_custom] == \
        ["gcloud node: compute.instances.delete"]
