"""Checks of the deployment files in deploy/ and clusters/.

Static checks (terraform fmt/validate, checkov, shellcheck) and behaviour
tests of the shell scripts: node-init.sh in --dry-run mode with metadata from
a directory, and the gcloud scripts against a fake gcloud
(tests/deploy_fixtures/fake_gcloud.py) that records every call and models
which resources exist. `bash tests/setup/deploy-tools.sh` installs shellcheck and
checkov; checkov is found through $CHECKOV.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TERRAFORM_DIR = DEPLOY / "terraform"
NODE_INIT = DEPLOY / "node-init.sh"
CREATE = DEPLOY / "gcloud" / "create.sh"
TEARDOWN = DEPLOY / "gcloud" / "teardown.sh"
CLUSTERS = ROOT / "clusters"
FAKE_GCLOUD = Path(__file__).resolve().parent / "deploy_fixtures" / "fake_gcloud.py"

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
        if script.name != "lib.sh":
            assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------
# node-init.sh (dry-run, metadata from a directory)

NODE_METADATA = {
    "poltergust-role": "node",
    "poltergust-path": "gs://my-bucket/pipeline",
    "poltergust-scheduler-url": "http://10.42.0.2:8082",
    "poltergust-topic": "poltergust-my-bucket",
    "poltergust-project": "my-project",
}
NODE_UNIT = "etc/systemd/system/poltergust-node.service"
LUIGID_UNIT = "etc/systemd/system/poltergust-luigid.service"


def run_init(tmp_path: Path, attributes: dict[str, str], project_id: str | None = "metadata-project",
             script: Path = NODE_INIT) -> tuple[subprocess.CompletedProcess[str], Path]:
    metadata = tmp_path / "metadata"
    shutil.rmtree(metadata, ignore_errors=True)
    (metadata / "instance" / "attributes").mkdir(parents=True)
    for name, value in attributes.items():
        (metadata / "instance" / "attributes" / name).write_text(value + "\n")
    if project_id is not None:
        (metadata / "project").mkdir()
        (metadata / "project" / "project-id").write_text(project_id)
    root = tmp_path / "root"
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "POLTERGUST_METADATA_DIR": str(metadata)}
    result = subprocess.run(["bash", str(script), "--dry-run", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
    return result, root


def unit_value(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(key + "=")]


def test_node_unit_runs_the_node_with_the_metadata_values(tmp_path: Path) -> None:
    result, root = run_init(tmp_path, NODE_METADATA)
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    assert unit_value(unit, "ExecStart") == [
        "/opt/poltergust/venv/bin/python -m poltergust.async_worker --path gs://my-bucket/pipeline "
        "--scheduler-url http://10.42.0.2:8082 --topic poltergust-my-bucket --project my-project "
        "--http-host 0.0.0.0 --http-port 8080"
    ]
    assert unit_value(unit, "Restart") == ["on-failure"]
    assert unit_value(unit, "KillSignal") == ["SIGTERM"]
    # Longer than the node's graceful shutdown (~10 s).
    assert int(unit_value(unit, "TimeoutStopSec")[0]) >= 30
    assert unit_value(unit, "User") == ["poltergust"]
    assert "WantedBy=multi-user.target" in unit
    assert not (root / LUIGID_UNIT).exists()
    # Dry-run: nothing installed, systemctl only announced.
    assert "would run: systemctl enable poltergust-node.service" in result.stderr
    assert "would run: /opt/poltergust/venv/bin/pip install --disable-pip-version-check --upgrade poltergust" \
        in result.stderr


def test_node_defaults_come_from_the_path_and_the_project_metadata(tmp_path: Path) -> None:
    attributes = {k: v for k, v in NODE_METADATA.items() if k not in ("poltergust-topic", "poltergust-project")}
    attributes["poltergust-package"] = "poltergust==1.2.3"
    result, root = run_init(tmp_path, attributes, project_id="metadata-project")
    assert result.returncode == 0, result.stderr
    exec_start = unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    assert "--topic poltergust-my-bucket --project metadata-project " in exec_start
    assert "--upgrade poltergust==1.2.3" in result.stderr


def test_node_takes_several_paths_and_optional_settings(tmp_path: Path) -> None:
    attributes = {**NODE_METADATA, "poltergust-path": "gs://my-bucket/pipeline gs://other-bucket/jobs",
                  "poltergust-max-concurrent": "2"}
    result, root = run_init(tmp_path, attributes)
    assert result.returncode == 0, result.stderr
    unit = (root / NODE_UNIT).read_text()
    assert "--path gs://my-bucket/pipeline --path gs://other-bucket/jobs --scheduler-url" in unit
    assert "Environment=POLTERGUST_MAX_CONCURRENT=2" in unit


def test_exec_start_quotes_unusual_values_for_systemd(tmp_path: Path) -> None:
    attributes = {**NODE_METADATA, "poltergust-path": 'gs://my-bucket/pipe$HOME%n"x\\y'}
    result, root = run_init(tmp_path, attributes)
    assert result.returncode == 0, result.stderr
    exec_start = unit_value((root / NODE_UNIT).read_text(), "ExecStart")[0]
    # Double quotes; $ and % doubled so systemd expands neither; \ and " escaped.
    assert ' --path "gs://my-bucket/pipe$$HOME%%n\\"x\\\\y" --scheduler-url ' in exec_start


def test_scheduler_role_gets_luigid_and_no_node(tmp_path: Path) -> None:
    result, root = run_init(tmp_path, {"poltergust-role": "scheduler"})
    assert result.returncode == 0, result.stderr
    assert not (root / NODE_UNIT).exists()
    unit = (root / LUIGID_UNIT).read_text()
    exec_start = unit_value(unit, "ExecStart")[0]
    assert exec_start.startswith("/opt/poltergust/venv/bin/luigid --port 8082 --address 0.0.0.0 --state-path ")
    assert "--logdir " in exec_start
    assert unit_value(unit, "Environment").count("LUIGI_CONFIG_PATH=/etc/poltergust/luigi.cfg") == 1
    cfg = (root / "etc/poltergust/luigi.cfg").read_text()
    assert "[scheduler]" in cfg
    assert re.search(r"^worker_disconnect_delay = 30$", cfg, re.M)
    assert "would run: systemctl enable poltergust-luigid.service" in result.stderr


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
        ({"poltergust-package": "--index-url=http://example.invalid/simple"}, "poltergust-package"),
        ({"poltergust-max-concurrent": "many"}, "poltergust-max-concurrent"),
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
    # Nothing half-done: settings are checked before anything is written.
    assert not (root / NODE_UNIT).exists() and not (root / LUIGID_UNIT).exists()
    assert "would run" not in result.stderr


def test_init_script_help_and_bad_arguments() -> None:
    result = subprocess.run(["bash", str(NODE_INIT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "POLTERGUST_METADATA_DIR" in result.stdout
    result = subprocess.run(["bash", str(NODE_INIT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "--bogus" in result.stderr


# ---------------------------------------------------------------------------
# gcloud scripts against a fake gcloud

MUTATING = {"create", "delete", "enable", "add-iam-policy-binding", "remove-iam-policy-binding",
            "set-autoscaling", "undelete", "rolling-action", "rm"}


class FakeGcloud:
    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "gcloud-state"
        self.state.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stub = bin_dir / "gcloud"
        stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_GCLOUD}" "$@"\n')
        stub.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                    "FAKE_GCLOUD_STATE": str(self.state), "POLTERGUST_RETRY_SLEEP": "0"}
        for name in list(self.env):
            if name.startswith("POLTERGUST_") and name != "POLTERGUST_RETRY_SLEEP":
                del self.env[name]
        self.seen = 0

    def run(self, *command: str | Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
        """Run a script; returns its result and the gcloud calls it made."""
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=120,
                                env={**self.env, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)
        calls_file = self.state / "calls.jsonl"
        lines = calls_file.read_text().splitlines() if calls_file.exists() else []
        calls = [json.loads(line) for line in lines[self.seen:]]
        self.seen = len(lines)
        return result, calls

    def add_subscription(self, name: str, topic: str) -> None:
        db = json.loads((self.state / "state.json").read_text())
        db["subscriptions"][name] = topic
        (self.state / "state.json").write_text(json.dumps(db))


def verb(call: list[str]) -> str:
    words = [w for w in call if not w.startswith("-")]
    return next((w for w in words if w in MUTATING | {"describe", "list", "get-iam-policy"}), "")


def mutations(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if verb(c) in MUTATING]


def matches(call: list[str], words: tuple[str, ...]) -> bool:
    """True if the call has these flags (--...) and, in a row, these other words."""
    flags = [w for w in words if w.startswith("--")]
    plain = [w for w in words if not w.startswith("--")]
    positional = [w for w in call if not w.startswith("-")]
    in_a_row = any(positional[i:i + len(plain)] == plain for i in range(len(positional) - len(plain) + 1))
    return in_a_row and all(f in call for f in flags)


def find(calls: list[list[str]], *words: str) -> list[str]:
    """The one call that matches these words (see matches)."""
    hits = [c for c in calls if matches(c, words)]
    assert len(hits) == 1, f"expected one call with {words}, got {hits}"
    return hits[0]


def metadata_of(call: list[str]) -> dict[str, str]:
    """The --metadata=^|^K=V|K=V... flag of a call as a dict (gcloud's ^|^ sets the separator)."""
    value = next(w for w in call if w.startswith("--metadata="))[len("--metadata="):]
    assert value.startswith("^|^"), value
    return dict(entry.split("=", 1) for entry in value[3:].split("|"))


def assert_flags(call: list[str], *flags: str) -> None:
    for flag in flags:
        assert flag in call, f"{flag} missing from {' '.join(call)}"


CREATE_ARGS = ["--project=my-proj", "--region=europe-west4", "--bucket=my-bucket",
               "--min-nodes=2", "--max-nodes=5", "--version=1.2.3"]


def test_create_makes_everything_once_then_nothing(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    first, calls = fake.run(CREATE, *CREATE_ARGS)
    assert first.returncode == 0, first.stderr
    created = mutations(calls)
    assert all("--project=my-proj" in c for c in calls)

    assert_flags(find(created, "services", "enable"), "compute.googleapis.com", "pubsub.googleapis.com")
    assert_flags(find(created, "buckets", "create", "gs://my-bucket"),
                 "--uniform-bucket-level-access", "--location=europe-west4")
    find(created, "pubsub", "topics", "create", "poltergust-my-bucket")
    assert_flags(find(created, "notifications", "create", "gs://my-bucket"),
                 "--topic=projects/my-proj/topics/poltergust-my-bucket",
                 "--event-types=OBJECT_FINALIZE,OBJECT_DELETE", "--object-prefix=pipeline/",
                 "--payload-format=json")
    # The storage service agent may publish to the topic.
    assert_flags(find(created, "topics", "add-iam-policy-binding", "--role=roles/pubsub.publisher"),
                 "--member=serviceAccount:service-123456@gs-project-accounts.iam.gserviceaccount.com")
    find(created, "iam", "service-accounts", "create", "poltergust-node")
    find(created, "iam", "service-accounts", "create", "poltergust-scheduler")

    # Least privilege: bucket-level object access, topic-level subscriber,
    # and a custom role with only the subscription permissions.
    node = "--member=serviceAccount:poltergust-node@my-proj.iam.gserviceaccount.com"
    assert_flags(find(created, "buckets", "add-iam-policy-binding", "gs://my-bucket"),
                 node, "--role=roles/storage.objectUser")
    assert_flags(find(created, "topics", "add-iam-policy-binding", "--role=roles/pubsub.subscriber"), node)
    role = find(created, "iam", "roles", "create", "poltergust_node_subscriptions")
    assert_flags(role, "--permissions=pubsub.subscriptions.consume,pubsub.subscriptions.create,"
                       "pubsub.subscriptions.get")
    assert_flags(find(created, "projects", "add-iam-policy-binding", "my-proj"), node,
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
    assert metadata_of(scheduler)["poltergust-role"] == "scheduler"
    assert_flags(scheduler, f"--metadata-from-file=startup-script={NODE_INIT}")

    assert_flags(find(created, "health-checks", "create", "http", "poltergust-node-health"),
                 "--port=8080", "--request-path=/healthz")
    template = find(created, "instance-templates", "create")
    assert metadata_of(template) == {
        "poltergust-role": "node", "poltergust-package": "poltergust==1.2.3",
        "poltergust-path": "gs://my-bucket/pipeline", "poltergust-scheduler-url": "http://10.42.0.2:8082",
        "poltergust-topic": "poltergust-my-bucket", "poltergust-project": "my-proj",
        "enable-oslogin": "TRUE", "block-project-ssh-keys": "TRUE",
    }
    assert_flags(template, f"--metadata-from-file=startup-script={NODE_INIT}")
    assert_flags(template, "--no-address", "--service-account=poltergust-node@my-proj.iam.gserviceaccount.com")
    mig = find(created, "instance-groups", "managed", "create", "poltergust-nodes")
    assert_flags(mig, "--region=europe-west4", "--health-check=poltergust-node-health", "--size=2")
    assert_flags(find(created, "set-autoscaling", "poltergust-nodes"),
                 "--min-num-replicas=2", "--max-num-replicas=5")

    second, calls = fake.run(CREATE, *CREATE_ARGS)
    assert second.returncode == 0, second.stderr
    assert mutations(calls) == [], "a second run must create nothing"
    assert calls and all(verb(c) in ("describe", "list", "get-iam-policy", "") for c in calls)
    assert "creating:" not in second.stderr


def test_create_rolls_nodes_to_a_new_template_when_settings_change(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    assert fake.run(CREATE, *CREATE_ARGS)[0].returncode == 0
    result, calls = fake.run(CREATE, *CREATE_ARGS, "--node-machine-type=n2-standard-8")
    assert result.returncode == 0, result.stderr
    changed = mutations(calls)
    assert len(changed) == 2, changed
    assert "instance-templates" in changed[0] and "create" in changed[0]
    assert_flags(changed[0], "--machine-type=n2-standard-8")
    assert "rolling-action" in changed[1] and "start-update" in changed[1]


def test_create_takes_settings_from_the_environment(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    env = {"POLTERGUST_PROJECT": "env-proj", "POLTERGUST_BUCKET": "env-bucket", "POLTERGUST_MAX_NODES": "7",
           "POLTERGUST_PACKAGE": "git+https://example.invalid/poltergust.git@main"}
    result, calls = fake.run(CREATE, env=env)
    assert result.returncode == 0, result.stderr
    find(calls, "buckets", "create", "gs://env-bucket")
    assert_flags(find(calls, "set-autoscaling"), "--max-num-replicas=7")
    assert metadata_of(find(calls, "instance-templates", "create"))["poltergust-package"] == \
        "git+https://example.invalid/poltergust.git@main"


def test_create_help_and_bad_settings(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    result, calls = fake.run(CREATE, "--help")
    assert result.returncode == 0 and "--max-nodes" in result.stdout and "POLTERGUST_PROJECT" in result.stdout
    assert calls == []
    result, calls = fake.run(CREATE, "--project=p-roject", "--min-nodes=5", "--max-nodes=2")
    assert result.returncode != 0 and "--min-nodes" in result.stderr
    assert mutations(calls) == []
    result, _ = fake.run(CREATE, "--project=p-roject", "--package=git+https://x.invalid/p.git", "--version=1")
    assert result.returncode != 0 and "--version" in result.stderr


def test_teardown_deletes_everything_but_the_bucket_once(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    assert fake.run(CREATE, *CREATE_ARGS)[0].returncode == 0
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
                  ("projects", "remove-iam-policy-binding", "my-proj"),
                  ("iam", "roles", "delete", "poltergust_node_subscriptions"),
                  ("service-accounts", "delete", "poltergust-node@my-proj.iam.gserviceaccount.com")]:
        find(deleted, *words)
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
    back, calls = fake.run(CREATE, *CREATE_ARGS)
    assert back.returncode == 0, back.stderr
    find(mutations(calls), "iam", "roles", "undelete", "poltergust_node_subscriptions")


# ---------------------------------------------------------------------------
# DataProc scripts


def test_dataproc_create_cluster_once_then_only_the_tunnel(tmp_path: Path) -> None:
    fake = FakeGcloud(tmp_path)
    env = {"POLTERGUST_PROJECT": "my-proj"}
    result, calls = fake.run("./dataproc-create-cluster.sh", "mycluster", "2", env=env, cwd=CLUSTERS)
    assert result.returncode == 0, result.stderr
    created = mutations(calls)
    assert_flags(find(created, "buckets", "create", "gs://mycluster"), "--uniform-bucket-level-access")
    find(created, "pubsub", "topics", "create", "poltergust-mycluster")
    assert_flags(find(created, "notifications", "create", "gs://mycluster"),
                 "--event-types=OBJECT_FINALIZE,OBJECT_DELETE", "--object-prefix=pipeline/",
                 "--topic=projects/my-proj/topics/poltergust-mycluster")
    upload = find(calls, "storage", "cp")
    assert upload[-1] == "gs://mycluster/dataproc/" and any(w.endswith("dataproc-init.sh") for w in upload)
    cluster = find(created, "dataproc", "clusters", "create", "mycluster")
    assert_flags(cluster, "--num-workers=2", "--initialization-actions=gs://mycluster/dataproc/dataproc-init.sh")
    assert metadata_of(cluster) == {
        "poltergust-path": "gs://mycluster/pipeline", "poltergust-topic": "poltergust-mycluster",
        "poltergust-project": "my-proj", "poltergust-package": "poltergust",
        "poltergust-init-url": "gs://mycluster/dataproc/node-init.sh",
    }
    ssh = find(calls, "compute", "ssh", "mycluster-m")
    assert ssh[ssh.index("--"):] == ["--", "-L", "8082:localhost:8082", "-N"]

    again, calls = fake.run("./dataproc-create-cluster.sh", "mycluster", "2", env=env, cwd=CLUSTERS)
    assert again.returncode == 0, again.stderr
    assert mutations(calls) == []
    find(calls, "compute", "ssh", "mycluster-m")

    deleted, calls = fake.run("./dataproc-delete-cluster.sh", "mycluster", env=env, cwd=CLUSTERS)
    assert deleted.returncode == 0, deleted.stderr
    removed = mutations(calls)
    find(removed, "dataproc", "clusters", "delete", "mycluster")
    find(removed, "pubsub", "topics", "delete", "poltergust-mycluster")
    assert not [c for c in removed if "rm" in c]
    assert mutations(fake.run("./dataproc-delete-cluster.sh", "mycluster", env=env, cwd=CLUSTERS)[1]) == []


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


@pytest.mark.parametrize(("dataproc_role", "unit"), [("Master", LUIGID_UNIT), ("Worker", NODE_UNIT)])
def test_dataproc_init_maps_roles_onto_node_init(tmp_path: Path, dataproc_role: str, unit: str) -> None:
    get_metadata = fake_get_metadata(tmp_path, {
        "dataproc-role": dataproc_role, "dataproc-master": "mycluster-m",
        "poltergust-path": "gs://mycluster/pipeline", "poltergust-topic": "poltergust-mycluster",
        "poltergust-project": "my-proj",
    })
    root = tmp_path / "root"
    env = {**os.environ, "POLTERGUST_GET_METADATA": str(get_metadata), "POLTERGUST_NODE_INIT": str(NODE_INIT)}
    result = subprocess.run(["bash", str(CLUSTERS / "dataproc-init.sh"), "--dry-run", "--root", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    units = sorted(p.name for p in (root / "etc/systemd/system").iterdir())
    assert units == [Path(unit).name]
    if dataproc_role == "Worker":
        assert unit_value((root / NODE_UNIT).read_text(), "ExecStart") == [
            "/opt/poltergust/venv/bin/python -m poltergust.async_worker --path gs://mycluster/pipeline "
            "--scheduler-url http://mycluster-m:8082 --topic poltergust-mycluster --project my-proj "
            "--http-host 0.0.0.0 --http-port 8080"
        ]
