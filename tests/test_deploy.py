"""Checks of the deployment files in deploy/ and clusters/.

Static checks (terraform fmt/validate, checkov, shellcheck) and behaviour
tests of the gcloud scripts against a fake gcloud
(tests/deploy_fixtures/fake_gcloud.py) that records every call and models
which resources exist (DataProc's: tests/test_dataproc.py). node-init.sh is
tested in tests/test_node_init.py (its units) and tests/test_boot.py (a real
boot). `bash tests/setup/deploy-tools.sh` installs shellcheck and checkov; checkov is
found through $CHECKOV.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_fixtures.gcloud_harness import (
    FakeGcloud,
    assert_flags,
    find,
    make_release,
    matches,
    metadata_of,
    mutations,
    release_attributes,
)

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TERRAFORM_DIR = DEPLOY / "terraform"
NODE_INIT = DEPLOY / "node-init.sh"
CREATE = DEPLOY / "gcloud" / "create.sh"
TEARDOWN = DEPLOY / "gcloud" / "teardown.sh"
CLUSTERS = ROOT / "clusters"

INSTALL_HINT = "run `bash tests/setup/deploy-tools.sh` (as root on Debian) to install it"


def shell_scripts() -> list[Path]:
    scripts = sorted([*DEPLOY.rglob("*.sh"), *CLUSTERS.rglob("*.sh")])
    ci_tools = ROOT / ".ci" / "deploy-tools.sh"
    return scripts + ([ci_tools] if ci_tools.exists() else [])


# ---------------------------------------------------------------------------
# Static checks


def terraform() -> str:
    path = os.environ.get("TERRAFORM") or shutil.which("terraform") or "/usr/local/bin/terraform"
    if not Path(path).exists():
        pytest.fail("terraform is not installed (set TERRAFORM to its path)")
    return path


def test_terraform_fmt() -> None:
    result = subprocess.run([terraform(), "fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"terraform fmt found unformatted files:\n{result.stdout}{result.stderr}"


def test_terraform_validate(tmp_path: Path) -> None:
    # A copy, so that init leaves no .terraform or lock file in the work tree;
    # the module reads ../../../node-init.sh, so copy all of deploy/.
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work)
    example = work / "terraform" / "example"
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_DATA_DIR": str(tmp_path / "tf-data")}
    try:
        init = subprocess.run([terraform(), "init", "-backend=false", "-input=false", "-no-color"],
                              cwd=example, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("terraform validate skipped: `terraform init` timed out fetching the google provider "
                    "(no access to the Terraform registry from this machine)")
    if init.returncode != 0:
        pytest.skip("terraform validate skipped: the google provider cannot be downloaded on this machine "
                    f"(`terraform init` failed):\n{init.stderr.strip()[-600:]}")
    result = subprocess.run([terraform(), "validate", "-no-color"], cwd=example,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_passes_with_explained_skips() -> None:
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if not checkov or not Path(checkov).exists():
        pytest.fail("checkov not found: set CHECKOV to its executable or put it on PATH; "
                    f"{INSTALL_HINT} (it goes into its own virtualenv, e.g. "
                    "`python3 -m venv /tmp/checkov-venv && /tmp/checkov-venv/bin/pip install checkov`)")
    # --skip-download: no calls to the checkov platform (not reachable here, not needed).
    result = subprocess.run([checkov, "-d", str(TERRAFORM_DIR), "--quiet", "--compact", "--skip-download"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = result.stdout
    assert result.returncode == 0, f"checkov failed:\n{report}\n{result.stderr[-2000:]}"
    assert re.search(r"Failed checks: 0\b", report) or "FAILED" not in report, report

    # Every skip is an inline comment with a reason worth the name.
    skips = []
    for tf in TERRAFORM_DIR.rglob("*.tf"):
        for line in tf.read_text().splitlines():
            if "checkov:skip" in line:
                match = re.fullmatch(r"\s*#\s*checkov:skip=(CKV2?_[A-Z]+_\d+):(.*)", line)
                assert match, f"{tf.name}: malformed checkov skip: {line.strip()}"
                assert len(match.group(2).split()) >= 5, f"{tf.name}: skip without a real reason: {line.strip()}"
                skips.append(match.group(1))
    assert skips, "expected the documented skips in the Terraform files"


def test_terraform_settings_fit_long_runs() -> None:
    """Read where terraform validate cannot run here: provider range, the group, the autoscaler, the bucket."""
    module = TERRAFORM_DIR / "modules" / "poltergust"
    for versions in (module / "versions.tf", TERRAFORM_DIR / "example" / "versions.tf"):
        # metric.filter and metric.single_instance_assignment of the autoscaler are GA from 5.21.
        assert re.search(r'version\s*=\s*">= 5\.21, < 7\.0"', versions.read_text()), versions
    nodes = (module / "nodes.tf").read_text()
    update_policy = re.search(r"update_policy \{(.*?)\n  \}", nodes, re.S).group(1)
    assert re.search(r'instance_redistribution_type\s*=\s*"NONE"', update_policy)
    autoscaling = re.search(r"autoscaling_policy \{(.*?)\n  \}", nodes, re.S).group(1)
    assert re.search(r'\bmode\s*=\s*"ONLY_SCALE_OUT"', autoscaling) and "scale_in_control" not in autoscaling
    bucket = re.search(r'resource "google_storage_bucket" "poltergust" \{(.*?)\n\}', (module / "main.tf").read_text(),
                       re.S).group(1)
    assert re.search(r"soft_delete_policy \{\s*retention_duration_seconds\s*=\s*0\s*\}", bucket)
    assert re.search(r"versioning \{\s*enabled\s*=\s*false\s*\}", bucket)


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.fail(f"shellcheck is not installed: {INSTALL_HINT} (or `apt-get install shellcheck`)")
    scripts = shell_scripts()
    assert NODE_INIT in scripts and CREATE in scripts
    result = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable() -> None:
    for script in shell_scripts():
        if script.name not in ("lib.sh", "dataproc-names.sh"):  # sourced, not run
            assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------
# gcloud scripts against a fake gcloud

def create_args(manifest: Path) -> list[str]:
    return ["--project=my-proj", "--region=europe-west4", "--bucket=my-bucket", "--min-nodes=2", "--max-nodes=5",
            f"--release={manifest}"]


NODE = "--member=serviceAccount:poltergust-node@my-proj.iam.gserviceaccount.com"
NOT_THE_RELEASE = '!resource.name.startsWith("projects/_/buckets/my-bucket/objects/_poltergust/dist/")'
SCHEDULER = "--member=serviceAccount:poltergust-scheduler@my-proj.iam.gserviceaccount.com"
TUNNEL = ("gcloud compute ssh poltergust-scheduler --project=my-proj --zone=europe-west4-b --tunnel-through-iap "
          "-- -L 8082:localhost:8082 -L 8090:localhost:8090 -N")


def test_create_makes_everything_once_then_nothing(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    first, calls = fake.run(CREATE, *create_args(manifest))
    assert first.returncode == 0, first.stderr
    created = mutations(calls)
    assert all("--project=my-proj" in c for c in calls)

    assert_flags(find(created, "services", "enable"), "compute.googleapis.com", "pubsub.googleapis.com")
    assert_flags(find(created, "buckets", "create", "gs://my-bucket"),
                 "--uniform-bucket-level-access", "--public-access-prevention", "--location=europe-west4",
                 "--soft-delete-duration=0")
    find(created, "pubsub", "topics", "create", "poltergust-my-bucket")
    assert_flags(find(created, "notifications", "create", "gs://my-bucket"),
                 "--topic=projects/my-proj/topics/poltergust-my-bucket",
                 "--event-types=OBJECT_FINALIZE,OBJECT_DELETE", "--object-prefix=pipeline/",
                 "--payload-format=json")
    # The storage service agent may publish to the topic.
    find(created, "topics", "add-iam-policy-binding", "--role=roles/pubsub.publisher",
         "--member=serviceAccount:service-123456@gs-project-accounts.iam.gserviceaccount.com")
    # The nodes publish calls for help on that topic, and only there.
    find(created, "topics", "add-iam-policy-binding", "poltergust-my-bucket", "--role=roles/pubsub.publisher", NODE)
    find(created, "iam", "service-accounts", "create", "poltergust-node")
    find(created, "iam", "service-accounts", "create", "poltergust-scheduler")

    # The release goes up once, below _poltergust/dist/VERSION/.
    attributes = release_attributes(manifest, "my-bucket")
    uploads = [c[c.index("cp") + 1:] for c in created if "cp" in c]
    assert uploads == [[str(manifest.parent / "0.1.0-0123456789ab" / "poltergust-0.1.0-py3-none-any.whl"),
                        attributes["poltergust-wheel-url"]],
                       [str(manifest.parent / "0.1.0-0123456789ab" / "requirements.lock"),
                        attributes["poltergust-lock-url"]]]

    # Least privilege: bucket-level object access but not to the release,
    # topic-level subscriber, and a custom role with only the subscription
    # permissions; the scheduler reads the bucket (its release, the dashboard's pipelines), never writes.
    bucket_grants = [c for c in created if matches(c, ("buckets", "add-iam-policy-binding", "gs://my-bucket"))]
    assert len(bucket_grants) == 3
    assert_flags(find(bucket_grants, NODE, "--role=roles/storage.objectUser"),
                 f"--condition=expression={NOT_THE_RELEASE},title=not-the-release")
    find(bucket_grants, NODE, "--role=roles/storage.objectViewer")
    scheduler_grants = [c for c in bucket_grants if SCHEDULER in c]
    assert len(scheduler_grants) == 1 and "--role=roles/storage.objectViewer" in scheduler_grants[0]
    assert not [w for w in scheduler_grants[0] if w.startswith("--condition")]
    assert_flags(find(created, "topics", "add-iam-policy-binding", "--role=roles/pubsub.subscriber"), NODE)
    role = find(created, "iam", "roles", "create", "poltergust_node_subscriptions")
    assert_flags(role, "--permissions=pubsub.subscriptions.consume,pubsub.subscriptions.create,"
                       "pubsub.subscriptions.delete,pubsub.subscriptions.get")
    find(created, "projects", "add-iam-policy-binding", "my-proj", NODE,
         "--role=projects/my-proj/roles/poltergust_node_subscriptions")
    assert not [c for c in created if "projects" in c and any("roles/pubsub.editor" in w or "roles/editor" in w
                                                               for w in c)]

    # Network and firewall: luigid only from the nodes, health checkers to 8080.
    find(created, "compute", "networks", "create", "poltergust-network")
    assert_flags(find(created, "firewall-rules", "create", "poltergust-allow-luigid-from-nodes"),
                 "--rules=tcp:8082",
                 "--source-service-accounts=poltergust-node@my-proj.iam.gserviceaccount.com",
                 "--target-service-accounts=poltergust-scheduler@my-proj.iam.gserviceaccount.com")
    assert_flags(find(created, "firewall-rules", "create", "poltergust-allow-health-checks"),
                 "--rules=tcp:8080", "--source-ranges=35.191.0.0/16,130.211.0.0/22")

    scheduler = find(created, "compute", "instances", "create", "poltergust-scheduler")
    assert_flags(scheduler, "--no-address", "--private-network-ip=10.42.0.2",
                 "--service-account=poltergust-scheduler@my-proj.iam.gserviceaccount.com")
    # The scheduler VM gets the pipeline path for its dashboard.
    assert metadata_of(scheduler) == {"poltergust-role": "scheduler", **attributes,
                                      "poltergust-path": "gs://my-bucket/pipeline",
                                      "enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE"}
    assert_flags(scheduler, f"--metadata-from-file=startup-script={NODE_INIT}")

    assert_flags(find(created, "health-checks", "create", "http", "poltergust-node-health"),
                 "--port=8080", "--request-path=/healthz")
    template = find(created, "instance-templates", "create")
    assert metadata_of(template) == {
        "poltergust-role": "node", **attributes,
        "poltergust-path": "gs://my-bucket/pipeline", "poltergust-scheduler-url": "http://10.42.0.2:8082",
        "poltergust-topic": "poltergust-my-bucket", "poltergust-project": "my-proj",
        "poltergust-backlog-subscription": "poltergust-backlog", "poltergust-max-concurrent": "4",
        "poltergust-retire-after": "900", "poltergust-min-nodes": "2",
        "enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE",
    }
    assert_flags(template, f"--metadata-from-file=startup-script={NODE_INIT}")
    assert_flags(template, "--no-address", "--service-account=poltergust-node@my-proj.iam.gserviceaccount.com")
    mig = find(created, "instance-groups", "managed", "create", "poltergust-nodes")
    assert_flags(mig, "--region=europe-west4", "--health-check=poltergust-node-health", "--size=2",
                 "--instance-redistribution-type=NONE")
    assert_flags(find(created, "subscriptions", "create", "poltergust-backlog"), "--topic=poltergust-my-bucket",
                 '--message-filter=attributes.eventType = "OBJECT_FINALIZE" AND (attributes.bucketId = "my-bucket"'
                 ' AND hasPrefix(attributes.objectId, "pipeline/"))',
                 "--expiration-period=never")
    # Scaled on the backlog (one node per --max-concurrent configs), not on CPU.
    autoscaling = find(created, "set-autoscaling", "poltergust-nodes")
    assert_flags(autoscaling, "--min-num-replicas=2", "--max-num-replicas=5",
                 "--update-stackdriver-metric=pubsub.googleapis.com/subscription/num_undelivered_messages",
                 "--stackdriver-metric-filter=resource.type = pubsub_subscription"
                 " AND resource.label.subscription_id = poltergust-backlog",
                 "--stackdriver-metric-single-instance-assignment=4", "--mode=only-scale-out")
    assert not [w for w in autoscaling if "cpu" in w or "scale-in" in w]
    # An idle node deletes itself from its group: a custom role with exactly that, on that group only.
    assert_flags(find(created, "iam", "roles", "create", "poltergust_node_retires"),
                 "--permissions=compute.instanceGroupManagers.get,compute.instanceGroupManagers.update")
    assert_flags(find(created, "projects", "add-iam-policy-binding",
                      "--role=projects/my-proj/roles/poltergust_node_retires"),
                 NODE, '--condition=expression=resource.name == "projects/my-proj/regions/europe-west4/'
                       'instanceGroupManagers/poltergust-nodes",title=only-the-node-group')
    # Nothing anywhere installs a package by name.
    assert not [w for c in calls for w in c if "poltergust-package" in w]
    # The IAP tunnel to luigid's page and the dashboard.
    assert TUNNEL in first.stdout

    second, calls = fake.run(CREATE, *create_args(manifest))
    assert second.returncode == 0, second.stderr
    assert mutations(calls) == [], "a second run must create nothing"
    assert "creating:" not in second.stderr


def test_create_hands_luigids_configuration_to_the_scheduler_vm(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    config = tmp_path / "luigid.cfg"
    config.write_text("[resources]\nwarehouse = 2\n")
    result, calls = fake.run(CREATE, *create_args(manifest), f"--luigid-config={config}")
    assert result.returncode == 0, result.stderr
    scheduler = find(mutations(calls), "compute", "instances", "create", "poltergust-scheduler")
    assert metadata_of(scheduler)["poltergust-luigid-config"] == "[resources]\nwarehouse = 2"
    # The same again changes nothing; a changed file updates the VM's metadata, applied at its next boot.
    result, calls = fake.run(CREATE, *create_args(manifest), f"--luigid-config={config}")
    assert result.returncode == 0 and mutations(calls) == [], result.stderr
    config.write_text("[resources]\nwarehouse = 3\n")
    result, calls = fake.run(CREATE, *create_args(manifest), f"--luigid-config={config}")
    assert result.returncode == 0, result.stderr
    assert metadata_of(find(mutations(calls), "instances", "add-metadata", "poltergust-scheduler")) == {
        "poltergust-luigid-config": "[resources]\nwarehouse = 3"}
    assert "gcloud compute instances reset poltergust-scheduler" in result.stderr
    config.write_text("[resources]\na|b = 1\n")
    result, _ = fake.run(CREATE, *create_args(manifest), f"--luigid-config={config}")
    assert result.returncode != 0 and "may not contain '|'" in result.stderr


def test_a_new_release_rolls_the_nodes_and_repoints_the_scheduler(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    assert fake.run(CREATE, *create_args(make_release(tmp_path / "one")))[0].returncode == 0
    manifest = make_release(tmp_path / "two", "0.1.0-fedcba987654", b"a changed wheel")
    result, calls = fake.run(CREATE, *create_args(manifest))
    assert result.returncode == 0, result.stderr
    changed = mutations(calls)
    assert [c[c.index("cp") + 2] for c in changed if "cp" in c] == list(release_attributes(
        manifest, "my-bucket").values())[::2]
    attributes = release_attributes(manifest, "my-bucket")
    assert metadata_of(find(changed, "instances", "add-metadata", "poltergust-scheduler")) == {
        **attributes, "poltergust-path": "gs://my-bucket/pipeline"}
    template = find(changed, "instance-templates", "create")
    assert metadata_of(template)["poltergust-wheel-sha256"] == attributes["poltergust-wheel-sha256"]
    assert_flags(find(changed, "rolling-action", "start-update", "poltergust-nodes"), "--max-unavailable=0")
    assert "gcloud compute instances reset poltergust-scheduler" in result.stderr
    assert len(changed) == 5, changed

    result, calls = fake.run(CREATE, *create_args(manifest), "--node-machine-type=n2-standard-8")
    assert result.returncode == 0, result.stderr
    changed = mutations(calls)
    assert len(changed) == 2, changed
    assert_flags(find(changed, "instance-templates", "create"), "--machine-type=n2-standard-8")
    find(changed, "rolling-action", "start-update")


def test_an_older_deploy_gets_the_dashboard_path_and_the_scheduler_reads_the_bucket(tmp_path: Path) -> None:
    """A deployment from before the dashboard: a scheduler without poltergust-path, reading only the release."""
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    assert fake.run(CREATE, *create_args(manifest))[0].returncode == 0
    member = SCHEDULER.split("=", 1)[1]
    only_the_release = ('expression=resource.name.startsWith("projects/_/buckets/my-bucket/objects/_poltergust/dist/")'
                        ',title=only-the-release')

    def make_it_older(db: dict) -> None:
        db["bindings"] = [b for b in db["bindings"] if b[2] != member] + [
            ["storage/buckets:gs://my-bucket", "roles/storage.objectViewer", member, only_the_release]]
        vm = next(v for k, v in db["resources"].items() if k.endswith(":poltergust-scheduler") and "metadata" in v)
        vm["metadata"] = vm["metadata"].replace("|poltergust-path=gs://my-bucket/pipeline", "")

    fake.edit(make_it_older)
    result, calls = fake.run(CREATE, *create_args(manifest))
    assert result.returncode == 0, result.stderr
    changed = mutations(calls)
    grant = find(changed, "buckets", "add-iam-policy-binding", SCHEDULER)
    assert "--role=roles/storage.objectViewer" in grant and not [w for w in grant if w.startswith("--condition")]
    assert metadata_of(find(changed, "instances", "add-metadata", "poltergust-scheduler"))["poltergust-path"] == \
        "gs://my-bucket/pipeline"
    assert len(changed) == 2, changed
    assert "gcloud compute instances reset poltergust-scheduler" in result.stderr
    # Teardown removes both of the scheduler's grants.
    result, calls = fake.run(TEARDOWN, "--project=my-proj", "--region=europe-west4", "--bucket=my-bucket", "--yes")
    assert result.returncode == 0, result.stderr
    assert_flags(find(mutations(calls), "remove-iam-policy-binding", SCHEDULER), "--all")


def test_create_takes_settings_and_secrets_from_the_environment(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    env = {"POLTERGUST_PROJECT": "env-proj", "POLTERGUST_BUCKET": "env-bucket", "POLTERGUST_MAX_NODES": "7",
           "POLTERGUST_RELEASE": str(manifest.parent), "POLTERGUST_SECRETS": "GITHUB_TOKEN=gh-token"}
    result, calls = fake.run(CREATE, "--secret", "DB_PASSWORD=db-password", env=env)
    assert result.returncode == 0, result.stderr
    find(calls, "buckets", "create", "gs://env-bucket")
    # Scale to zero by default.
    assert_flags(find(calls, "set-autoscaling"), "--min-num-replicas=0", "--max-num-replicas=7")
    assert "secretmanager.googleapis.com" in find(calls, "services", "enable")
    metadata = metadata_of(find(calls, "instance-templates", "create"))
    assert metadata["poltergust-secrets"] == "GITHUB_TOKEN=gh-token DB_PASSWORD=db-password"
    assert metadata["poltergust-wheel-url"].startswith("gs://env-bucket/_poltergust/dist/")
    for secret in ("gh-token", "db-password"):
        assert_flags(find(calls, "secrets", "add-iam-policy-binding", secret),
                     "--role=roles/secretmanager.secretAccessor",
                     "--member=serviceAccount:poltergust-node@env-proj.iam.gserviceaccount.com")


def test_create_help_and_bad_settings(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    result, calls = fake.run(CREATE, "--help")
    assert result.returncode == 0 and "--max-nodes" in result.stdout and "POLTERGUST_RELEASE" in result.stdout
    assert calls == []
    for bad, message in [(["--min-nodes=5", "--max-nodes=2"], "--min-nodes"),
                         (["--package=poltergust"], "--package is gone"),
                         (["--secret=TOKEN"], "--secret TOKEN"),
                         ([f"--release={tmp_path / 'nothing.json'}"], "no release at")]:
        result, calls = fake.run(CREATE, "--project=p-roject", f"--release={manifest}", *bad)
        assert result.returncode != 0 and message in result.stderr, (bad, result.stderr)
        assert mutations(calls) == []
    (manifest.parent / "0.1.0-0123456789ab" / "requirements.lock").write_text("luigi\n")
    result, calls = fake.run(CREATE, "--project=p-roject", f"--release={manifest}")
    assert result.returncode != 0 and "do not match" in result.stderr
    assert mutations(calls) == []


@pytest.mark.parametrize(("bucket", "message"), [
    ({"project-number": "999", "uniform-bucket-level-access": True, "public-access-prevention": True},
     "belongs to project number 999"),
    ({"public-access-prevention": True}, "no uniform bucket-level access"),
    ({"uniform-bucket-level-access": True}, "does not enforce public access prevention"),
    # A deleted config would be OBJECT_ARCHIVE, which the notification does not publish.
    ({"uniform-bucket-level-access": True, "public-access-prevention": True, "versioning": True},
     "has object versioning on"),
])
def test_create_refuses_a_bucket_it_cannot_trust(tmp_path: Path, bucket: dict, message: str) -> None:
    fake = FakeGcloud(tmp_path)
    fake.edit(lambda db: db["resources"].__setitem__("storage/buckets:gs://my-bucket", bucket))
    result, calls = fake.run(CREATE, *create_args(make_release(tmp_path / "dist")))
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert [c for c in mutations(calls) if "services" not in c] == []


def test_a_reused_bucket_with_soft_delete_and_an_old_backlog_filter_are_named(tmp_path: Path) -> None:
    """Neither is changed (soft delete may protect other data; a new backlog would drop waiting configs)."""
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    old_filter = '(attributes.bucketId = "my-bucket" AND hasPrefix(attributes.objectId, "pipeline/"))'

    def reused(db: dict) -> None:
        db["resources"]["storage/buckets:gs://my-bucket"] = {
            "uniform-bucket-level-access": True, "public-access-prevention": True}  # GCS's default soft delete
        db["resources"]["pubsub/subscriptions:poltergust-backlog"] = {"message-filter": old_filter}

    fake.edit(reused)
    result, calls = fake.run(CREATE, *create_args(manifest))
    assert result.returncode == 0, result.stderr
    assert "keeps deleted and overwritten objects for 604800s" in result.stderr
    assert "--soft-delete-duration=0" in result.stderr
    assert "poltergust-backlog has filter" in result.stderr
    assert "subscriptions delete poltergust-backlog" in result.stderr
    changed = mutations(calls)
    assert not [c for c in changed if matches(c, ("buckets", "update")) or matches(c, ("buckets", "create"))]
    assert not [c for c in changed if "subscriptions" in c]
    # A bucket without soft delete and the new filter: no warning.
    fake.edit(lambda db: db["resources"]["storage/buckets:gs://my-bucket"].__setitem__("soft-delete-duration", "0"))
    fake.edit(lambda db: db["resources"]["pubsub/subscriptions:poltergust-backlog"].__setitem__(
        "message-filter", 'attributes.eventType = "OBJECT_FINALIZE" AND (attributes.bucketId = "my-bucket" AND '
                          'hasPrefix(attributes.objectId, "pipeline/"))'))
    result, calls = fake.run(CREATE, *create_args(manifest))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_an_old_subscription_role_gets_the_delete_permission(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    old = "pubsub.subscriptions.consume,pubsub.subscriptions.create,pubsub.subscriptions.get"
    fake.edit(lambda db: db["resources"].__setitem__("iam/roles:poltergust_node_subscriptions", {"permissions": old}))
    result, calls = fake.run(CREATE, *create_args(make_release(tmp_path / "dist")))
    assert result.returncode == 0, result.stderr
    assert "pubsub.subscriptions.delete" in " ".join(find(mutations(calls), "iam", "roles", "update"))


def test_teardown_deletes_everything_but_the_bucket_once(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    assert fake.run(CREATE, *create_args(manifest))[0].returncode == 0
    fake.add_subscription("projects/my-proj/subscriptions/poltergust-node-abcd", "poltergust-my-bucket")

    refused, calls = fake.run(TEARDOWN, "--project=my-proj", "--region=europe-west4", "--bucket=my-bucket")
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert mutations(calls) == []

    result, calls = fake.run(TEARDOWN, "--project=my-proj", "--region=europe-west4", "--bucket=my-bucket", "--yes")
    assert result.returncode == 0, result.stderr
    deleted = mutations(calls)
    for words in [("instance-groups", "managed", "delete", "poltergust-nodes"),
                  ("instance-templates", "delete"),
                  ("health-checks", "delete", "poltergust-node-health"),
                  ("instances", "delete", "poltergust-scheduler"),
                  ("firewall-rules", "delete", "poltergust-allow-luigid-from-nodes"),
                  ("networks", "delete", "poltergust-network"),
                  ("subscriptions", "delete", "projects/my-proj/subscriptions/poltergust-node-abcd"),
                  ("notifications", "delete"),
                  ("topics", "delete", "poltergust-my-bucket"),
                  ("projects", "remove-iam-policy-binding", "my-proj",
                   "--role=projects/my-proj/roles/poltergust_node_subscriptions"),
                  ("projects", "remove-iam-policy-binding", "my-proj",
                   "--role=projects/my-proj/roles/poltergust_node_retires"),
                  ("iam", "roles", "delete", "poltergust_node_retires"),
                  ("buckets", "remove-iam-policy-binding", "--role=roles/storage.objectUser", "--all"),
                  ("iam", "roles", "delete", "poltergust_node_subscriptions"),
                  ("service-accounts", "delete", "poltergust-node@my-proj.iam.gserviceaccount.com")]:
        find(deleted, *words)
    assert len([c for c in deleted if "--role=roles/storage.objectViewer" in c]) == 2
    assert not [c for c in deleted if "gs://my-bucket" in c and ("rm" in c or "delete" in c)], \
        "the bucket is kept without --delete-bucket"
    # The group goes before its template, the VMs before the network.
    order = [" ".join(c) for c in deleted]
    assert order.index(" ".join(find(deleted, "managed", "delete"))) < \
        order.index(" ".join(find(deleted, "instance-templates", "delete")))

    again, calls = fake.run(TEARDOWN, "--project=my-proj", "--region=europe-west4", "--bucket=my-bucket", "--yes")
    assert again.returncode == 0, again.stderr
    assert mutations(calls) == [], "a second teardown must delete nothing"

    gone, calls = fake.run(TEARDOWN, "--project=my-proj", "--region=europe-west4", "--bucket=my-bucket",
                           "--yes", "--delete-bucket")
    assert gone.returncode == 0, gone.stderr
    assert [c[c.index("rm"):] for c in mutations(calls)] == [["rm", "--recursive", "gs://my-bucket"]]

    # Deploying again after a teardown revives the soft-deleted custom role.
    back, calls = fake.run(CREATE, *create_args(manifest))
    assert back.returncode == 0, back.stderr
    find(mutations(calls), "iam", "roles", "undelete", "poltergust_node_subscriptions")


# ---------------------------------------------------------------------------
# bake-image.sh

BAKE = DEPLOY / "bake-image.sh"
BAKE_ENV = {"POLTERGUST_BAKE_POLL": "0"}


def bake_args(manifest: Path) -> list[str]:
    return ["--project=my-proj", "--region=europe-west4", "--bucket=my-bucket", f"--release={manifest}",
            "--environment=gs://my-bucket/environment/a.yaml", "--environment", "gs://my-bucket/environment/b.yaml"]


def test_bake_image_makes_an_image_from_a_bake_vm_and_deletes_the_vm(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    result, calls = fake.run(BAKE, *bake_args(manifest), env=BAKE_ENV)
    assert result.returncode == 0, result.stderr
    assert all("--project=my-proj" in c for c in calls)
    shape = [[w for w in c if not w.startswith("-") and w != "gcloud"][:3] for c in calls]
    # The release uploaded, the VM made, watched until it powered off, its disk imaged, the VM deleted: in order.
    files = manifest.parent / "0.1.0-0123456789ab"
    assert shape[:4] == [["storage", "objects", "describe"],
                         ["storage", "cp", str(files / "poltergust-0.1.0-py3-none-any.whl")],
                         ["storage", "objects", "describe"], ["storage", "cp", str(files / "requirements.lock")]]
    assert shape[4:] == [
        ["compute", "instances", "create"], *[["compute", "instances", "describe"]] * 3,
        ["compute", "instances", "get-serial-port-output"], ["compute", "images", "create"],
        ["compute", "instances", "delete"]]
    create = find(calls, "compute", "instances", "create")
    vm = create[create.index("create") + 1]
    assert re.fullmatch(r"poltergust-bake-\d{8}-\d{6}", vm)
    assert_flags(create, "--zone=europe-west4-b", "--subnet=poltergust-europe-west4", "--no-address",
                 "--service-account=poltergust-node@my-proj.iam.gserviceaccount.com", "--scopes=cloud-platform",
                 "--image-family=debian-12", "--image-project=debian-cloud", "--shielded-secure-boot",
                 f"--metadata-from-file=startup-script={NODE_INIT}")
    assert metadata_of(create) == {
        "poltergust-role": "bake", **release_attributes(manifest, "my-bucket"),
        "poltergust-bake-environments": "gs://my-bucket/environment/a.yaml gs://my-bucket/environment/b.yaml",
        "enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE"}
    assert all(c[-2:] == ["--zone=europe-west4-b", "--format=value(status)"] and vm in c
               for c in calls if matches(c, ("compute", "instances", "describe")))
    image = find(calls, "compute", "images", "create")
    assert_flags(image, f"--source-disk={vm}", "--source-disk-zone=europe-west4-b", "--family=poltergust-node")
    assert re.fullmatch(r"poltergust-node-\d{8}-\d{6}", image[image.index("create") + 1])
    assert_flags(find(calls, "compute", "instances", "delete"), vm, "--zone=europe-west4-b")
    assert "POLTERGUST_IMAGE_FAMILY=poltergust-node POLTERGUST_IMAGE_PROJECT=my-proj" in result.stdout


def test_bake_image_fails_clearly_and_deletes_the_vm_when_the_bake_did_not_finish(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    manifest = make_release(tmp_path / "dist")
    serial = "poltergust-init: installing release\npoltergust-init: error: could not build the environments (see above)"
    env = {**BAKE_ENV, "FAKE_GCLOUD_SERIAL": serial}
    result, calls = fake.run(BAKE, *bake_args(manifest), env=env)
    assert result.returncode == 1
    assert "powered off without node-init.sh saying 'bake done'" in result.stderr
    assert "error: could not build the environments" in result.stderr
    assert not [c for c in calls if matches(c, ("compute", "images", "create"))]
    find(calls, "compute", "instances", "delete")

    env = {**BAKE_ENV, "FAKE_GCLOUD_STATUS": "RUNNING"}
    result, calls = fake.run(BAKE, *bake_args(manifest), "--timeout=2", env=env)
    assert result.returncode == 1 and "did not power off within 2s (status RUNNING)" in result.stderr
    find(calls, "compute", "instances", "delete")


@pytest.mark.parametrize("bad, message", [
    (["--environment=/etc/env.yaml"], "--environment /etc/env.yaml: expected gs://BUCKET/OBJECT"),
    (["--family=Bad_Family"], "--family Bad_Family"),
    (["--timeout=soon"], "--timeout soon"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_bake_image_help_and_bad_settings(tmp_path: Path, bad: list[str], message: str) -> None:
    fake = FakeGcloud(tmp_path)
    result, calls = fake.run(BAKE, "--help")
    assert result.returncode == 0 and "--environment URL" in result.stdout and calls == []
    result, calls = fake.run(BAKE, "--project=my-proj", f"--release={make_release(tmp_path / 'dist')}", *bad)
    assert result.returncode == 1 and message in result.stderr
    assert mutations(calls) == []
