"""Load: 200 pipelines dropped at once on 3 nodes all finish once, and the nodes return to idle."""
from __future__ import annotations

import pytest
import yaml
from harness import free_port, scrape, wait_for

PIPELINES = 200


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_200_pipelines_on_3_nodes(start_node, bucket, environment_yaml, tmp_path) -> None:
    ports = [free_port() for _ in range(3)]
    nodes = [start_node(f"node-{i}", "--http-port", str(port)) for i, port in enumerate(ports)]
    bucket.upload("environment/test.yaml", environment_yaml)
    warm = tmp_path / "warm"
    bucket.upload("pipeline/warm.config.yaml", yaml.safe_dump({
        "environment": bucket.url("environment/test.yaml"),
        "task": {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(warm)}}))
    wait_for(lambda: bucket.exists("pipeline/warm.done.yaml"), 120, "the warm-up pipeline")
    wait_for(lambda: all(scrape(p)["poltergust_runs_active"] == 0 for p in ports), 60, "the warm-up to end")
    idle = [scrape(port) for port in ports]

    for i in range(PIPELINES):
        bucket.upload(f"pipeline/load-{i:03d}.config.yaml", yaml.safe_dump({
            "environment": bucket.url("environment/test.yaml"),
            "task": {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / f"o{i}")}}))

    def finished() -> bool:
        names = bucket.names("pipeline/load-")
        return sum(n.endswith((".done.yaml", ".error.yaml")) for n in names) >= PIPELINES and not any(
            n.endswith(".config.yaml") for n in names)

    wait_for(finished, 900, f"{PIPELINES} pipelines to finish", interval=1.0)
    names = bucket.names("pipeline/load-")
    for i in range(PIPELINES):
        results = [n for n in names if n.startswith(f"pipeline/load-{i:03d}.") and n.endswith("yaml")]
        assert results == [f"pipeline/load-{i:03d}.done.yaml"], results

    def settled() -> list[dict[str, float]] | None:
        now = [scrape(port) for port in ports]
        calm = all(
            m["poltergust_runs_active"] == 0
            and m["process_open_fds"] <= i["process_open_fds"] + 10
            and m["poltergust_asyncio_tasks"] <= i["poltergust_asyncio_tasks"] + 3
            for m, i in zip(now, idle))
        return now if calm else None

    after = wait_for(settled, 120, "the nodes to return to idle", interval=1.0)
    print(f"\n{'node':8} {'fds idle/after':>16} {'tasks idle/after':>17} {'RSS MB idle/after':>18} {'runs':>5}")
    for node, i, a in zip(nodes, idle, after):
        print(f"{node.node_name:8} {i['process_open_fds']:>7.0f}/{a['process_open_fds']:<8.0f} "
              f"{i['poltergust_asyncio_tasks']:>8.0f}/{a['poltergust_asyncio_tasks']:<8.0f} "
              f"{i['process_resident_memory_bytes'] / 2**20:>8.0f}/{a['process_resident_memory_bytes'] / 2**20:<9.0f} "
              f"{a['poltergust_runs_started_total']:>5.0f}")
        assert a["process_resident_memory_bytes"] < i["process_resident_memory_bytes"] * 1.5 + 100 * 2**20
    assert sum(a['poltergust_runs_claimed_total{outcome="done"}'] for a in after) == PIPELINES + 1
