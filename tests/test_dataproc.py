"""The DataProc scripts in clusters/ against the fake gcloud (tests/deploy_fixtures/fake_gcloud.py).

How clusters/dataproc-init.sh hands DataProc's metadata to node-init.sh is
in tests/test_node_init.py.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from deploy_fixtures.gcloud_harness import (
    FakeGcloud,
    assert_flags,
    find,
    make_release,
    metadata_of,
    mutations,
    release_attributes,
)

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
NODE_INIT = ROOT / "deploy" / "node-init.sh"

DATAPROC_SA = "poltergust-mycluster@my-proj.iam.gserviceaccount.com"


def test_dataproc_create_cluster_once_then_only_the_tunnel(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    env = {"POLTERGUST_PROJECT": "my-proj", "POLTERGUST_RELEASE": str(manifest)}
    result, calls = fake.run("./dataproc-create-cluster.sh", "mycluster", "2", env=env, cwd=CLUSTERS)
    assert result.returncode == 0, result.stderr
    created = mutations(calls)
    assert_flags(find(created, "buckets", "create", "gs://mycluster"), "--uniform-bucket-level-access",
                 "--public-access-prevention")
    find(created, "pubsub", "topics", "create", "poltergust-mycluster")
    assert_flags(find(created, "notifications", "create", "gs://mycluster"),
                 "--event-types=OBJECT_FINALIZE,OBJECT_DELETE", "--object-prefix=pipeline/",
                 "--topic=projects/my-proj/topics/poltergust-mycluster")

    # The release and the init scripts lie below _poltergust/dist/, which the cluster cannot write.
    attributes = release_attributes(manifest, "mycluster")
    uploads = [c[-1] for c in created if "cp" in c]
    assert uploads[:2] == [attributes["poltergust-wheel-url"], attributes["poltergust-lock-url"]]
    init_dir = uploads[2].rsplit("/", 1)[0]
    assert init_dir.startswith("gs://mycluster/_poltergust/dist/0.1.0-0123456789ab/init-")
    assert uploads[2:] == [f"{init_dir}/dataproc-init.sh", f"{init_dir}/node-init.sh"]

    # Its own service account, never the Compute Engine default one, with the node grants only.
    member = f"--member=serviceAccount:{DATAPROC_SA}"
    find(created, "iam", "service-accounts", "create", "poltergust-mycluster")
    assert_flags(find(created, "buckets", "add-iam-policy-binding", "--role=roles/storage.objectUser", member),
                 '--condition=expression=!resource.name.startsWith('
                 '"projects/_/buckets/mycluster/objects/_poltergust/dist/"),title=not-the-release')
    find(created, "buckets", "add-iam-policy-binding", "--role=roles/storage.objectViewer", member)
    worker = find(created, "projects", "add-iam-policy-binding", "--role=roles/dataproc.worker", member)
    condition = next(w for w in worker if w.startswith("--condition="))
    assert 'resource.name.startsWith("projects/_/buckets/mycluster/objects/")' in condition
    assert '!resource.name.startsWith("projects/_/buckets/mycluster/objects/_poltergust/dist/")' in condition
    find(created, "projects", "add-iam-policy-binding", "--role=projects/my-proj/roles/poltergust_dataproc_node",
         member)
    assert_flags(find(created, "iam", "roles", "create", "poltergust_dataproc_node"),
                 "--permissions=pubsub.subscriptions.consume,pubsub.subscriptions.create,"
                 "pubsub.subscriptions.delete,pubsub.subscriptions.get")
    find(created, "topics", "add-iam-policy-binding", "--role=roles/pubsub.subscriber", member)

    # A network of its own: luigid's port only from the cluster, NAT for installs.
    find(created, "compute", "networks", "create", "mycluster-net")
    assert_flags(find(created, "subnets", "create", "mycluster-subnet"), "--enable-private-ip-google-access")
    find(created, "routers", "nats", "create", "mycluster-nat")
    assert_flags(find(created, "firewall-rules", "create", "mycluster-internal"),
                 f"--source-service-accounts={DATAPROC_SA}", f"--target-service-accounts={DATAPROC_SA}")
    assert not [c for c in created if "firewall-rules" in c and "--source-ranges=0.0.0.0/0" in c]

    cluster = find(created, "dataproc", "clusters", "create", "mycluster")
    assert_flags(cluster, "--num-workers=2", f"--initialization-actions={init_dir}/dataproc-init.sh",
                 f"--service-account={DATAPROC_SA}", "--subnet=mycluster-subnet", "--no-address",
                 "--bucket=mycluster", "--temp-bucket=mycluster")
    node_init_sha = hashlib.sha256(NODE_INIT.read_bytes()).hexdigest()
    assert metadata_of(cluster) == {
        "poltergust-path": "gs://mycluster/pipeline", "poltergust-topic": "poltergust-mycluster",
        "poltergust-project": "my-proj", **attributes,
        "poltergust-init-url": f"{init_dir}/node-init.sh", "poltergust-init-sha256": node_init_sha,
    }
    ssh = find(calls, "compute", "ssh", "mycluster-m")
    assert "--tunnel-through-iap" in ssh and ssh[ssh.index("--"):] == ["--", "-L", "8082:localhost:8082", "-N"]

    again, calls = fake.run("./dataproc-create-cluster.sh", "mycluster", "2", env=env, cwd=CLUSTERS)
    assert again.returncode == 0, again.stderr
    assert mutations(calls) == []
    find(calls, "compute", "ssh", "mycluster-m")

    deleted, calls = fake.run("./dataproc-delete-cluster.sh", "mycluster", env=env, cwd=CLUSTERS)
    assert deleted.returncode == 0, deleted.stderr
    removed = mutations(calls)
    for words in [("dataproc", "clusters", "delete", "mycluster"), ("pubsub", "topics", "delete"),
                  ("firewall-rules", "delete", "mycluster-internal"), ("networks", "delete", "mycluster-net"),
                  ("remove-iam-policy-binding", "--role=roles/dataproc.worker", "--all"),
                  ("service-accounts", "delete", DATAPROC_SA)]:
        find(removed, *words)
    assert not [c for c in removed if "rm" in c]
    assert mutations(fake.run("./dataproc-delete-cluster.sh", "mycluster", env=env, cwd=CLUSTERS)[1]) == []


def test_dataproc_refuses_another_projects_bucket(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    fake.edit(lambda db: db["resources"].__setitem__("storage/buckets:gs://mycluster", {
        "project-number": "42", "uniform-bucket-level-access": True, "public-access-prevention": True}))
    env = {"POLTERGUST_PROJECT": "my-proj", "POLTERGUST_RELEASE": str(make_release(tmp_path / "dist"))}
    result, calls = fake.run("./dataproc-create-cluster.sh", "mycluster", "2", env=env, cwd=CLUSTERS)
    assert result.returncode != 0 and "belongs to project number 42" in result.stderr
    assert mutations(calls) == []
