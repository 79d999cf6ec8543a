"""An idle node removes itself from its managed instance group: the deploy's scale-in.

The autoscaler only scales out, because it scales in without regard to the
pipelines a VM runs. This loop (a unit node-init.sh writes beside the node's)
reads the node's own /metrics: once no run has been active for `--after`
seconds and the group is larger than `--min-nodes`, it asks the group to delete
this VM (`deleteInstances`, with the VM's token from the metadata server). The
group then shuts the VM down, which stops the node cleanly. It needs
compute.instanceGroupManagers.get and .update on the group, nothing else
(deploy/permissions.yaml). Standard library only: it runs beside the node.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("poltergust.retire")

COMPUTE_URL = os.environ.get("POLTERGUST_COMPUTE_URL", "https://compute.googleapis.com")
METADATA_URL = f"http://{os.environ.get('GCE_METADATA_HOST', 'metadata.google.internal')}/computeMetadata/v1"


class NotInGroup(Exception):
    """The VM was not made by a managed instance group: there is nothing to leave."""


def runs_active(metrics_url: str) -> float | None:
    """The node's poltergust_runs_active gauge; None while the node does not answer (booting, restarting)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    for line in text.splitlines():
        if line.startswith("poltergust_runs_active "):
            return float(line.split()[1])
    return None


def _metadata(path: str) -> str:
    request = urllib.request.Request(f"{METADATA_URL}/{path}", headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


@dataclass(frozen=True)
class Instance:
    """This VM as the group knows it."""

    group: str
    """projects/PROJECT/regions/R/instanceGroupManagers/M (or zones/Z for a zonal group)."""
    url: str
    """zones/ZONE/instances/NAME, the form deleteInstances takes."""

    @classmethod
    def from_metadata(cls) -> "Instance":
        try:
            created_by = _metadata("instance/attributes/created-by")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotInGroup("no created-by attribute") from exc
            raise
        project = _metadata("project/project-id")
        # created-by names the project by number; the IAM condition on the grant names it by id.
        parts = created_by.split("/")
        if len(parts) != 6 or parts[0] != "projects" or parts[4] != "instanceGroupManagers":
            raise NotInGroup(f"created by {created_by!r}, not by a managed instance group")
        zone = _metadata("instance/zone").rsplit("/", 1)[-1]
        name = _metadata("instance/name")
        return cls("/".join(["projects", project, *parts[2:]]), f"zones/{zone}/instances/{name}")


def _compute(method: str, path: str, body: dict | None = None) -> dict:
    token = json.loads(_metadata("instance/service-accounts/default/token"))["access_token"]
    request = urllib.request.Request(
        f"{COMPUTE_URL}/compute/v1/{path}", method=method, data=json.dumps(body).encode() if body else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def retire(instance: Instance, min_nodes: int) -> bool:
    """Delete this VM from its group unless that would leave fewer than `min_nodes`; whether it asked."""
    size = int(_compute("GET", instance.group).get("targetSize", 0))
    if size <= min_nodes:
        log.info("idle, but the group has %d node(s), its minimum is %d: staying", size, min_nodes)
        return False
    _compute("POST", f"{instance.group}/deleteInstances",
             {"instances": [instance.url], "skipInstancesOnValidationError": True})
    log.info("idle: asked %s to delete %s (group size %d, minimum %d)", instance.group, instance.url, size,
             min_nodes)
    return True


def watch(metrics_url: str, after: float, min_nodes: int, interval: float,
          clock: Callable[[], float] = time.monotonic) -> None:
    """Check every `interval` seconds; retire once idle for `after` seconds. Returns once asked (or not in a group)."""
    try:
        instance = Instance.from_metadata()
    except NotInGroup as exc:
        log.info("not in a managed instance group (%s): never retiring", exc)
        return
    idle_since: float | None = None
    while True:
        active = runs_active(metrics_url)
        now = clock()
        if active is None or active > 0:
            idle_since = None
            log.info("busy: %s run(s) active", "unknown" if active is None else int(active))
        else:
            idle_since = now if idle_since is None else idle_since
            log.info("idle for %.0fs of %.0fs", now - idle_since, after)
            if now - idle_since >= after:
                try:
                    if retire(instance, min_nodes):
                        return
                except (OSError, urllib.error.URLError, ValueError) as exc:
                    log.error("cannot retire through %s: %s", instance.group, exc)
                idle_since = now  # the group is at its minimum, or the call failed: look again after `after`
        time.sleep(interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m poltergust.node.retire", description=__doc__.split("\n")[0])
    parser.add_argument("--metrics-url", required=True, help="the node's /metrics")
    parser.add_argument("--after", type=float, required=True, help="seconds without a run before retiring")
    parser.add_argument("--min-nodes", type=int, default=0, help="never shrink the group below this")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    watch(args.metrics_url, args.after, args.min_nodes, args.interval)


if __name__ == "__main__":
    main()
