"""Nodes sharing a host keep their local files apart: a data directory per node name, and unique names."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from poltergust.node import lifecycle as node
from poltergust.settings import DEFAULT_ROOT, parse_settings


def test_nodes_without_data_dir_get_one_each_and_share_environments() -> None:
    first = parse_settings(["--path", "/srv/bucket/pipeline", "--node-name", "alpha"])
    second = parse_settings(["--path", "/srv/bucket/pipeline", "--node-name", "beta"])
    assert first.data_dir == DEFAULT_ROOT / "nodes" / "alpha"
    assert second.data_dir == DEFAULT_ROOT / "nodes" / "beta"
    assert first.env_dir == second.env_dir == DEFAULT_ROOT / "environments"


def test_a_second_node_process_with_the_same_name_gets_its_own_name_and_data_dir() -> None:
    name = f"twin-{uuid.uuid4().hex[:8]}"
    held = len(node._NAME_LOCKS)
    try:
        first, _ = node.take_node_name(parse_settings(["--path", "/srv/b/pipeline", "--node-name", name]))
        second, said = node.take_node_name(parse_settings(["--path", "/srv/b/pipeline", "--node-name", name]))
        explicit, _ = node.take_node_name(parse_settings(["--path", "/srv/b/pipeline", "--node-name", name,
                                                          "--data-dir", "/srv/mine"]))
        elsewhere, _ = node.take_node_name(parse_settings(["--path", "/srv/other/pipeline", "--node-name", name]))
    finally:
        for fd in node._NAME_LOCKS[held:]:
            os.close(fd)
        del node._NAME_LOCKS[held:]
        for path in Path(tempfile.gettempdir()).glob(f"poltergust-node-{name}*.lock"):
            path.unlink()
    assert (first.node_name, second.node_name, explicit.node_name) == (name, f"{name}-2", f"{name}-3")
    assert f"this one is {name}-2" in said
    assert elsewhere.node_name == name, "a node watching other paths shares nothing with them: its name is free"
    assert first.data_dir == DEFAULT_ROOT / "nodes" / name
    assert second.data_dir == DEFAULT_ROOT / "nodes" / f"{name}-2"
    assert explicit.data_dir == Path("/srv/mine")  # a directory given on the command line is kept
