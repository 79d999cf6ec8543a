"""The permission audit: the calls each identity makes, the permissions they need, and what each deploy grants.

Real GCP checks IAM on every call; the emulators check nothing. Calls come
from the real stack (storage requests recorded by a proxy) and from the code
(Pub/Sub client methods, found by reading poltergust/); deploy/permissions.yaml
maps each call to its permissions and lists the predefined roles' permissions.
Grants come from the deploys themselves: Terraform's IAM resources, and the
gcloud calls create.sh and dataproc-create-cluster.sh make against the fake gcloud.
"""
from __future__ import annotations

import ast
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TABLE = yaml.safe_load((ROOT / "deploy" / "permissions.yaml").read_text())
MODULE = ROOT / "deploy" / "terraform" / "modules" / "poltergust"

PUBSUB_METHODS = {"create_subscription", "get_subscription", "delete_subscription", "update_subscription",
                  "subscribe", "pull", "acknowledge", "modify_ack_deadline", "publish", "create_topic",
                  "get_topic", "delete_topic", "list_subscriptions", "seek"}
"""Client methods that reach Pub/Sub: each one the code calls needs a row in the table."""

USES = {"terraform": {"node": {"node", "init-node", "init-secrets", "retire"},
                      "scheduler": {"dashboard", "init-scheduler"}},
        "gcloud": {"node": {"node", "init-node", "init-secrets", "retire"},
                   "scheduler": {"dashboard", "init-scheduler"}},
        # One account for the whole cluster; no managed group, so no retire.
        "dataproc": {"cluster": {"node", "init-node", "dashboard", "init-scheduler"}}}
"""Per deploy: its identities and which programs run as each."""


def _row_pattern(match: str) -> tuple[str, re.Pattern[str], dict[str, str]] | None:
    """(method, path regex, required query) of a storage row; None for other rows."""
    words = match.split()
    if words[0] not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        return None
    path = re.escape(words[1]).replace(r"\{object\}", "[^/?]+").replace(r"\{bucket\}", "[^/?]+")
    query = dict(word.split("=", 1) for word in words[2:])
    return words[0], re.compile(path), query


def storage_row(method: str, raw_path: str) -> dict | None:
    """The first table row matching a recorded storage request."""
    path, _, query = raw_path.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    for row in TABLE["calls"]:
        pattern = _row_pattern(row["match"])
        if pattern and pattern[0] == method and pattern[1].fullmatch(path) and \
                all(params.get(k) == v for k, v in pattern[2].items()):
            return row
    return None


def _row(match: str) -> dict:
    rows = [row for row in TABLE["calls"] if row["match"] == match]
    assert rows, f"deploy/permissions.yaml has no row for {match!r}"
    return rows[0]


def pubsub_calls(package: Path = ROOT / "poltergust") -> dict[str, set[str]]:
    """Pub/Sub client methods called in the code, by who calls them (the dashboard's modules, or the node)."""
    found: dict[str, set[str]] = {}
    for source in package.rglob("*.py"):
        text = source.read_text()
        if "pubsub_v1" not in text:
            continue
        who = "dashboard" if "dashboard" in source.parts else "node"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in PUBSUB_METHODS:
                found.setdefault(who, set()).add(f"pubsub {node.func.attr}")
    return found


@dataclass
class Needs:
    """Permissions needed, by program (who), each with the calls that need it."""

    by_who: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def add(self, who: str, call: str, row: dict | None) -> None:
        if row is None:
            self.unknown.append(f"{who}: {call}")
            return
        for permission in row["permissions"]:
            self.by_who.setdefault(who, {}).setdefault(permission, set()).add(call)


def needs(recorded: dict[str, list[tuple[str, str]]]) -> Needs:
    """Every permission the recorded storage requests, the code's Pub/Sub calls and the static calls need."""
    result = Needs()
    for who, requests in recorded.items():
        for method, path in requests:
            result.add(who, f"{method} {path.partition('?')[0]}", storage_row(method, path))
    for who, calls in pubsub_calls().items():
        for call in calls:
            rows = [row for row in TABLE["calls"] if row["match"] == call]
            result.add(who, call, rows[0] if rows else None)
    for who, calls in TABLE["static"].items():
        for call in calls:
            result.add(who, call, _row(call))
    return result


@dataclass(frozen=True)
class Grant:
    identity: str
    role: str
    scope: str
    """Where: bucket, topic, project, secret."""


def role_permissions(role: str, custom: dict[str, list[str]]) -> set[str]:
    if role in custom:
        return set(custom[role])
    assert role in TABLE["roles"], f"deploy/permissions.yaml does not list the permissions of {role}"
    return set(TABLE["roles"][role]["permissions"])


def terraform_grants(module: Path = MODULE, drop: str = "") -> tuple[list[Grant], dict[str, list[str]]]:
    """IAM members and custom roles of the Terraform module (`drop`: a resource name to leave out)."""
    text = "\n".join(path.read_text() for path in sorted(module.glob("*.tf")))
    custom = {}
    for name, body in re.findall(r'resource "google_project_iam_custom_role" "(\w+)" \{(.*?)\n\}', text, re.S):
        custom[f"custom:{name}"] = re.findall(r'"([a-z]+\.[A-Za-z]+\.[A-Za-z]+)"', body.split("permissions", 1)[1])
    grants = []
    for kind, name, body in re.findall(r'resource "(google_\w+_iam_member)" "(\w+)" \{(.*?)\n\}', text, re.S):
        if name == drop:
            continue
        role = re.search(r"^\s*role\s*=\s*(.+)$", body, re.M).group(1).strip()
        custom_role = re.fullmatch(r"google_project_iam_custom_role\.(\w+)\.id", role)
        role = f"custom:{custom_role.group(1)}" if custom_role else role.strip('"')
        member = re.search(r"^\s*member\s*=\s*(.+)$", body, re.M).group(1)
        identity = "node" if "node" in member else "scheduler" if "scheduler" in member else "other"
        scope = kind.removeprefix("google_").removesuffix("_iam_member").split("_")[-1]
        grants.append(Grant(identity, role, scope))
    return grants, custom


def gcloud_grants(calls: list[list[str]], identities: dict[str, str]) -> tuple[list[Grant], dict[str, list[str]]]:
    """Grants from the gcloud calls a deploy script made (identities: service account id prefix -> identity)."""
    custom: dict[str, list[str]] = {}
    grants = []
    for call in calls:
        flags = dict(w[2:].split("=", 1) for w in call if w.startswith("--") and "=" in w)
        if "roles" in call and "create" in call:
            role_id = call[call.index("create") + 1]
            custom[f"projects/{flags['project']}/roles/{role_id}"] = flags["permissions"].split(",")
        if "add-iam-policy-binding" in call:
            email = flags["member"].split(":", 1)[1]
            identity = next((who for prefix, who in identities.items() if email.startswith(prefix + "@")), "other")
            scope = {"buckets": "bucket", "topics": "topic", "projects": "project", "secrets": "secret"}[
                call[call.index("add-iam-policy-binding") - 1]]
            grants.append(Grant(identity, flags["role"], scope))
    return grants, custom


@dataclass
class Report:
    missing: list[str]
    """identity: permission (needed by: calls) that no grant gives."""
    unused_custom: list[str]
    unused_predefined: list[str]


def audit(deploy: str, need: Needs, grants: list[Grant], custom: dict[str, list[str]]) -> Report:
    """Compare what each identity of `deploy` needs with what its grants give."""
    missing, unused_custom, unused_predefined = [], [], []
    for identity, programs in USES[deploy].items():
        wanted: dict[str, set[str]] = {}
        for who in programs:
            for permission, calls in need.by_who.get(who, {}).items():
                wanted.setdefault(permission, set()).update(f"{who} {c}" for c in calls)
        given: dict[str, set[str]] = {}
        for grant in grants:
            if grant.identity == identity:
                for permission in role_permissions(grant.role, custom):
                    given.setdefault(permission, set()).add(grant.role)
        for permission in sorted(set(wanted) - set(given)):
            missing.append(f"{deploy} {identity}: {permission} (needed by {', '.join(sorted(wanted[permission]))})")
        for permission in sorted(set(given) - set(wanted)):
            line = f"{deploy} {identity}: {permission} (from {', '.join(sorted(given[permission]))})"
            if any(role in custom for role in given[permission]):
                unused_custom.append(line)
            else:
                unused_predefined.append(line)
    return Report(missing, unused_custom, unused_predefined)
