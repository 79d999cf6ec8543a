"""A stand-in for the gcloud CLI used by tests/test_deploy.py.

It appends each call's argv (one JSON list per line) to $FAKE_GCLOUD_STATE/calls.jsonl
and keeps a small model of the cloud in $FAKE_GCLOUD_STATE/state.json, so that the
deploy scripts' describe-before-create logic can be exercised: `describe` fails
until the matching `create` ran, `create` of something that exists fails like the
real one does, `delete` of something missing fails, IAM bindings are remembered
and answered through `get-iam-policy --filter=...`, and so on.

Only the shapes of commands the deploy scripts use are understood. Flags are
expected as --flag=value (the scripts always write them so).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

STATE_DIR = Path(os.environ["FAKE_GCLOUD_STATE"])
CALLS = STATE_DIR / "calls.jsonl"
DB = STATE_DIR / "state.json"

VERBS = {
    "create", "describe", "delete", "list", "enable", "add-iam-policy-binding",
    "remove-iam-policy-binding", "get-iam-policy", "set-autoscaling", "undelete",
    "list-subscriptions", "rolling-action", "ssh", "cp", "rm", "service-agent", "get-value", "update",
    "add-metadata", "get-serial-port-output",
}
SCHEDULER_IP = "10.42.0.2"
PROJECT_NUMBER = "123456789"
SERVICE_AGENT = "service-123456@gs-project-accounts.iam.gserviceaccount.com"


def load() -> dict:
    if DB.exists():
        return json.loads(DB.read_text())
    return {"resources": {}, "bindings": [], "services": [], "notifications": {},
            "subscriptions": {}, "next_id": 1}


def fail(message: str, code: int = 1) -> None:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str]) -> None:
    with CALLS.open("a") as log:
        log.write(json.dumps(argv) + "\n")
    if "--" in argv:
        argv = argv[: argv.index("--")]
    flags: dict[str, object] = {}
    positionals: list[str] = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            flags[key] = value if eq else True
        elif not arg.startswith("-"):
            positionals.append(arg)
    verb_at = next((i for i, word in enumerate(positionals) if word in VERBS), None)
    if verb_at is None:
        fail(f"fake gcloud does not know {argv}", 2)
    group, verb, rest = positionals[:verb_at], positionals[verb_at], positionals[verb_at + 1:]
    project = str(flags.get("project", "stub-project"))
    db = load()
    out = run(db, "/".join(group), verb, rest, flags, project)
    DB.write_text(json.dumps(db, indent=1))
    if out:
        print(out)


def key_of(group: str, name: str, project: str) -> str:
    if group == "iam/service-accounts" and "@" not in name:
        name = f"{name}@{project}.iam.gserviceaccount.com"
    if group == "storage" and name.startswith("gs://"):  # storage rm -r gs://B
        group = "storage/buckets"
    return f"{group}:{name}"


def run(db: dict, group: str, verb: str, rest: list[str], flags: dict, project: str) -> str:
    resources: dict = db["resources"]

    if verb == "get-value":
        return project
    if verb == "service-agent":
        return SERVICE_AGENT
    if group == "services":
        if verb == "enable":
            db["services"] += [api for api in rest if api not in db["services"]]
            return ""
        return "\n".join(db["services"])
    if verb == "ssh":
        return ""
    if verb == "get-serial-port-output":  # what a bake VM's node-init.sh printed ($FAKE_GCLOUD_SERIAL: other)
        if key_of(group, rest[0], project) not in resources:
            fail(f"NOT_FOUND: {rest[0]}")
        return os.environ.get("FAKE_GCLOUD_SERIAL", "poltergust-init: bake done: release 0123, 2 environment(s)")
    if verb == "cp":  # storage cp SOURCE... DESTINATION: remember the objects made
        *sources, destination = rest
        for source in sources:
            url = destination + Path(source).name if destination.endswith("/") else destination
            resources[f"storage/objects:{url}"] = {"source": source}
        return ""
    if group == "projects" and verb == "describe":
        return PROJECT_NUMBER

    if group == "storage/buckets/notifications":
        notifications = db["notifications"]
        if verb == "create":
            bucket = rest[0]
            notifications.setdefault(bucket, []).append({"id": str(db["next_id"]), "topic": flags.get("topic")})
            db["next_id"] += 1
            return ""
        if verb == "list":
            return "\n".join(n["id"] for n in notifications.get(rest[0], []))
        if verb == "delete":
            match = re.fullmatch(r"projects/_/buckets/([^/]+)/notificationConfigs/(\d+)", rest[0])
            if not match:
                fail(f"bad notification name {rest[0]}")
            bucket = "gs://" + match.group(1)
            kept = [n for n in notifications.get(bucket, []) if n["id"] != match.group(2)]
            if len(kept) == len(notifications.get(bucket, [])):
                fail("NOT_FOUND: notification")
            notifications[bucket] = kept
            return ""

    if group == "pubsub/topics" and verb == "list-subscriptions":
        topic = rest[0]
        return "\n".join(name for name, of in db["subscriptions"].items() if of == topic)
    if group == "pubsub/subscriptions" and verb == "delete":
        if rest[0] not in db["subscriptions"]:
            fail(f"NOT_FOUND: {rest[0]}")
        del db["subscriptions"][rest[0]]
        return ""

    if verb == "list":
        return "\n".join(k.split(":", 1)[1] for k in sorted(resources) if k.startswith(group + ":"))

    if group == "compute/health-checks" and verb == "create":
        rest = rest[1:]  # "create http NAME"
    if verb == "rolling-action":
        rest = rest[1:]  # "rolling-action start-update NAME"
    key = key_of(group, rest[0], project)

    if verb == "create":
        if key in resources:
            fail(f"ALREADY_EXISTS: {key}")
        resources[key] = {k: v for k, v in flags.items() if k not in ("quiet", "project")}
        return ""
    if verb == "describe":
        if key not in resources:
            fail(f"NOT_FOUND: {key}")
        return describe(db, key, str(flags.get("format", "")))
    if verb in ("delete", "rm"):
        if key not in resources or resources[key].get("deleted"):
            fail(f"NOT_FOUND: {key}")
        if group == "iam/roles":
            resources[key]["deleted"] = True  # custom roles are soft-deleted
        else:
            for k in [k for k in resources if k == key or k.startswith(key + ":")]:
                del resources[k]
        return ""
    if verb == "undelete":
        resources[key]["deleted"] = False
        return ""
    if verb == "update":
        resources[key].update({k: v for k, v in flags.items() if k not in ("quiet", "project")})
        return ""
    if verb == "add-metadata":
        items = metadata_items(str(resources[key].get("metadata", "")))
        items.update(metadata_items(str(flags["metadata"])))
        resources[key]["metadata"] = "^|^" + "|".join(f"{k}={v}" for k, v in items.items())
        return ""
    if verb == "set-autoscaling":
        resources[key + ":autoscaler"] = {k: v for k, v in flags.items() if k not in ("quiet", "project")}
        return ""
    if verb == "rolling-action":
        resources[key]["template"] = str(flags["version"]).split("=", 1)[1]
        return ""
    if verb in ("add-iam-policy-binding", "remove-iam-policy-binding", "get-iam-policy"):
        # Secrets are made by the operator, outside the scripts.
        if group not in ("projects", "secrets") and key not in resources:
            fail(f"NOT_FOUND: {key}")
        # A binding is [resource, role, member], plus the condition's expression if it has one.
        condition = str(flags.get("condition", "None"))
        binding = [key, flags.get("role"), flags.get("member"), *([] if condition == "None" else [condition])]
        if verb == "add-iam-policy-binding":
            if binding not in db["bindings"]:
                db["bindings"].append(binding)
            return ""
        if verb == "remove-iam-policy-binding":
            gone = [b for b in db["bindings"] if b == binding or ("all" in flags and b[:3] == binding[:3])]
            if not gone:
                fail("binding not found")
            db["bindings"] = [b for b in db["bindings"] if b not in gone]
            return ""
        match = re.fullmatch(r'bindings\.role="([^"]+)" AND bindings\.members="([^"]+)"'
                             r'( AND NOT bindings\.condition:\*)?', str(flags.get("filter", "")))
        if not match:
            fail(f"fake gcloud expects get-iam-policy with a role/member filter, got {flags}", 2)
        wanted = [key, match.group(1), match.group(2)]
        found = [b for b in db["bindings"] if b[:3] == wanted and (len(b) == 3 or not match.group(3))]
        return match.group(1) if found else ""
    fail(f"fake gcloud cannot {verb} {group}", 2)
    return ""


def metadata_items(flag: str) -> dict[str, str]:
    """--metadata=^|^K=V|K=V... as a dict."""
    if not flag:
        return {}
    separator = "|" if flag.startswith("^|^") else ","
    return dict(entry.split("=", 1) for entry in flag.removeprefix("^|^").split(separator))


def describe(db: dict, key: str, fmt: str) -> str:
    resource = db["resources"][key]
    if fmt == "json":
        items = metadata_items(str(resource.get("metadata", "")))
        return json.dumps({"metadata": {"items": [{"key": k, "value": v} for k, v in items.items()]}})
    if fmt.startswith('value[separator="|"](projectNumber,'):  # storage buckets describe --raw
        uniform = "True" if resource.get("uniform-bucket-level-access") else "False"
        prevention = "enforced" if resource.get("public-access-prevention") else "inherited"
        versioning = "True" if resource.get("versioning") else ""
        soft_delete = str(resource.get("soft-delete-duration", "604800"))  # GCS's default: 7 days
        return "|".join((str(resource.get("project-number", PROJECT_NUMBER)), uniform, prevention, versioning,
                         soft_delete))
    if fmt == "value(filter)":  # pubsub subscriptions describe
        return str(resource.get("message-filter", ""))
    if fmt == "value(includedPermissions)":
        return str(resource.get("permissions", "")).replace(",", ";")
    if fmt == "value(status)":  # a VM runs for two looks, then has powered off ($FAKE_GCLOUD_STATUS: always that)
        resource["looks"] = resource.get("looks", 0) + 1
        return os.environ.get("FAKE_GCLOUD_STATUS") or ("RUNNING" if resource["looks"] <= 2 else "TERMINATED")
    if fmt == "value(address)":
        return SCHEDULER_IP
    if fmt == "value(instanceTemplate.basename())":
        return str(resource.get("template", ""))
    if fmt == "value(status.autoscaler)":
        return "autoscaler-1" if key + ":autoscaler" in db["resources"] else ""
    if fmt == "value(deleted)":
        return "True" if resource.get("deleted") else ""
    if fmt == "value(config.gceClusterConfig.zoneUri.basename())":
        return str(resource.get("zone") or "europe-north1-a")
    return f"name: {key.split(':', 1)[1]}"


if __name__ == "__main__":
    main(sys.argv[1:])
