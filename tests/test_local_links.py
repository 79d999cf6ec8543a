"""A local-directory bucket never follows a symbolic link: whoever can write to it cannot aim a node elsewhere.

`pipeline/evil.config.yaml -> ../environment/victim.yaml` once made the node
overwrite (and delete) the victim with its claim; `pipeline/.poltergust ->
elsewhere` made it write its temporary files, metadata and locks there and
delete files there. Both are refused, in the store and on the real stack.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from harness import result, submit, wait_for

from poltergust.storage import NotFound, StorageError
from poltergust.storage.local import LocalStore

VICTIM = "virtualenv: {}\ndependencies: [luigi]\n"


def plant(root: Path) -> tuple[Path, Path]:
    """The victim file and the evil config linking to it; also a hidden folder linked elsewhere in `other/`."""
    (root / "environment").mkdir(parents=True)
    victim = root / "environment" / "victim.yaml"
    victim.write_text(VICTIM)
    (root / "pipeline").mkdir()
    (root / "pipeline" / "evil.config.yaml").symlink_to("../environment/victim.yaml")
    return victim, root / "pipeline" / "evil.config.yaml"


def test_a_linked_object_is_no_object_and_a_write_replaces_only_the_link(tmp_path: Path) -> None:
    victim, link = plant(tmp_path / "bucket")
    store = LocalStore(tmp_path / "bucket")

    async def attack() -> None:
        assert [info.name for info in await store.list("pipeline/")] == []
        with pytest.raises(NotFound):
            await store.read("pipeline/evil.config.yaml")
        with pytest.raises(NotFound):
            await store.stat("pipeline/evil.config.yaml")
        with pytest.raises(NotFound):
            await store.delete("pipeline/evil.config.yaml")
        await store.write("pipeline/evil.config.yaml", b"claimed", metadata={"claimed-by": "node-a"})

    asyncio.run(attack())
    assert victim.read_text() == VICTIM
    assert not link.is_symlink() and link.read_text() == "claimed"


def test_a_linked_folder_is_refused_for_every_operation(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "bucket", tmp_path / "elsewhere"
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "a.config.yaml").write_text("x")
    elsewhere.mkdir()
    (elsewhere / "a.config.yaml.lock").write_text("precious")
    (elsewhere / "a.config.yaml.1.meta.json").write_text("precious")
    (root / "pipeline" / ".poltergust").symlink_to(elsewhere)
    (root / "linked").symlink_to(elsewhere)
    store = LocalStore(root)
    before = {path.name: path.read_text() for path in elsewhere.iterdir()}

    async def attack() -> None:
        for call in (lambda: store.write("pipeline/a.config.yaml", b"y", metadata={"k": "v"}),
                     lambda: store.delete("pipeline/a.config.yaml"),
                     lambda: store.write("linked/b.config.yaml", b"y"),
                     lambda: store.read("linked/a.config.yaml.lock")):
            with pytest.raises(StorageError):
                await call()
        assert await store.list("linked/") == []

    asyncio.run(attack())
    assert {path.name: path.read_text() for path in elsewhere.iterdir()} == before
    assert (root / "pipeline" / "a.config.yaml").read_text() == "x"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_node_never_claims_through_a_linked_config(start_node, bucket, environment_yaml: str,
                                                     tmp_path: Path) -> None:
    victim, link = plant(bucket.root)
    node = start_node("node-a")
    # A config submitted after the link, to know the node has looked at the directory (its first scan).
    submit(bucket, "fine", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o")},
           environment_yaml)
    assert result(bucket, "fine", "done")["poltergust"]["outcome"] == "done"
    node.check_alive()
    assert victim.read_text() == VICTIM and link.is_symlink()
    assert [name for name in bucket.names("pipeline/") if name.startswith("pipeline/evil.")] \
        == ["pipeline/evil.config.yaml"], "no result, claim or log for the link"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_node_writes_nothing_through_a_linked_hidden_folder(start_node, bucket, environment_yaml: str,
                                                              tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious")
    (bucket.root / "pipeline").mkdir(parents=True, exist_ok=True)
    (bucket.root / "pipeline" / ".poltergust").symlink_to(elsewhere)
    node = start_node("node-a")
    submit(bucket, "trapped", {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "o")},
           environment_yaml)
    wait_for(lambda: "is not a folder (a symbolic link?)" in node.output(), 120,
             "the node to refuse the linked .poltergust folder")
    node.check_alive()
    assert os.listdir(elsewhere) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "precious"
