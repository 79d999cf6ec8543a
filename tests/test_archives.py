"""Hostile shared environment archives: a node refuses them, builds instead, and writes nothing outside.

The first tests unpack crafted archives directly; the last one uploads them
into the GCS emulator's bucket where a real node with `--share-environments`
finds them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from harness import WHEELHOUSE, wait_for

from poltergust.config import parse_environment
from poltergust.environments import Environments, archive, plan
from poltergust.environments.archive import ArchiveRefused, Limits

KEY_VARIABLE = "TEST_ARCHIVE_SHARE_KEY"
SECRET = b"archive-test-key-" + os.urandom(16).hex().encode()
INTERPRETER = os.path.realpath(sys.executable)


def file(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def link(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def directory(name: str) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def venv(*extra: tuple[tarfile.TarInfo, bytes | None], manifest: dict | None = None) -> list:
    """The members every environment archive has, then `extra`."""
    return [file(".poltergust.json", json.dumps(manifest or {}).encode()), directory("bin"),
            link("bin/python", "/usr/bin/python3"), link("bin/python3", "python"), *extra]


def counts(data: bytes) -> tuple[int, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    return len(members), sum(member.size for member in members if member.isreg())


def metadata(data: bytes, key: str = "k" * 32, identity: dict | None = None, secret: bytes = SECRET,
             members: int | None = None, unpacked: int | None = None) -> dict[str, str]:
    real_members, real_unpacked = counts(data)
    packed = archive.Packed(data, hashlib.sha256(data).hexdigest(), real_members if members is None else members,
                            real_unpacked if unpacked is None else unpacked)
    return archive.metadata_for(packed, key, identity or {}, "test", secret)


def unpack(tmp_path: Path, entries: list, **declared) -> Path:
    """Unpack into `tmp_path/box/env`, where anything escaping would land in `box` or `tmp_path`."""
    data = tar_of(*entries)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "archive.tar.gz"
    path.write_bytes(data)
    destination = tmp_path / "box" / "env"
    archive.unpack(path, destination, INTERPRETER, metadata(data, **declared), Limits())
    return destination


def nothing_outside(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive.tar.gz", "box"]
    assert [p.name for p in (tmp_path / "box").iterdir()] == ["env"]


# -- unpacking crafted archives -------------------------------------------------------


@pytest.mark.parametrize("members, refusal", [
    ([link("d", "."), link("d/up", ".."), link("up/up2", ".."), file("up/up2/pwned", b"x")],
     "its member 'd/up' passes through 'd', which is not a directory"),
    ([link("a", "."), link("b", "a/.."), file("b/pwned", b"x")], "its link 'b' points outside the environment"),
    ([link("x", "l/../pwned"), link("l", ".")], "its link 'x' points outside the environment"),
    ([link("lib", "/etc")], "its link 'lib' points outside the environment"),
    ([hardlink("h", "../../pwned")], "it refers to the unsafe path '../../pwned'"),
    ([hardlink("h", "bin/python")], "its hard link 'h' does not point to a file of the archive"),
    ([file("../pwned", b"x")], "it holds the unsafe path '../pwned'"),
    ([file("/tmp/pwned", b"x")], "it holds the unsafe path '/tmp/pwned'"),
    ([file("tool", b"#!/bin/sh\n", 0o4755)], "it holds 'tool' with a set-id bit"),
], ids=["symlink-chain", "link-through-link", "link-changed-by-later-link", "absolute-link", "hardlink-outside",
        "hardlink-to-a-link", "dotdot", "absolute-name", "set-id"])
def test_members_that_would_escape_are_refused(tmp_path: Path, members: list, refusal: str) -> None:
    with pytest.raises(ArchiveRefused, match=refusal.replace("(", r"\(").replace(")", r"\)")):
        unpack(tmp_path, venv(*members))
    nothing_outside(tmp_path)


def test_other_member_types_and_a_foreign_interpreter_are_refused(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(ArchiveRefused, match="'fifo', which is not a file, directory or link"):
        unpack(tmp_path / "1", venv((fifo, None)))
    with pytest.raises(ArchiveRefused, match="its bin/python is not a link to the interpreter"):
        unpack(tmp_path / "2", [file("bin/python", b"#!/bin/sh\ntouch /tmp/pwned\n", 0o755)])
    with pytest.raises(ArchiveRefused, match="its bin/python3 is not a link to the interpreter"):
        unpack(tmp_path / "3", venv(link("bin/python3", "../../../usr/bin/python3")))
    with pytest.raises(ArchiveRefused, match="its bin/python is not a link to the interpreter"):
        unpack(tmp_path / "4", [directory("bin"), link("bin/python", "python3")])


def test_interpreter_links_are_made_anew_and_a_good_archive_unpacks(tmp_path: Path) -> None:
    destination = unpack(tmp_path, venv(
        directory("lib"), file("lib/module.py", b"print('hi')\n"), link("lib64", "lib"),
        file("bin/tool", b"#!/bin/sh\n", 0o775), hardlink("bin/tool2", "bin/tool"),
        file("bin/python-argcomplete-check-easy-install-script", b"#!/bin/sh\n", 0o755),
    ))
    assert os.readlink(destination / "bin" / "python") == INTERPRETER, "not the archive's /usr/bin/python3"
    assert os.readlink(destination / "bin" / "python3") == "python"
    assert (destination / "lib64" / "module.py").read_text() == "print('hi')\n"
    assert oct((destination / "bin" / "tool").stat().st_mode & 0o7777) == oct(0o755), "no group write"
    assert (destination / "bin" / "tool").stat().st_ino == (destination / "bin" / "tool2").stat().st_ino


def test_counts_and_sizes_beyond_the_declared_ones_are_refused_while_unpacking(tmp_path: Path) -> None:
    many = [file(f"f{i}", b"x") for i in range(20)]
    with pytest.raises(ArchiveRefused, match="it holds more members than it declares"):
        unpack(tmp_path / "1", venv(*many), members=10)
    with pytest.raises(ArchiveRefused, match="it unpacks to more bytes than it declares"):
        unpack(tmp_path / "2", venv(file("big", bytes(2 << 20))), unpacked=1 << 20)
    # A header that asks tarfile to read 1 GiB into memory in one go.
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 1 << 30
    raw = header.tobuf(tarfile.USTAR_FORMAT) + bytes(4096)
    path = tmp_path / "pax.tar.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ArchiveRefused, match="it holds a header of|it unpacks to more than it declares"):
        archive.unpack(path, tmp_path / "3", INTERPRETER, metadata(tar_of(*venv())), Limits())


def test_metadata_is_checked_before_downloading_and_the_bytes_after() -> None:
    data = tar_of(*venv())
    identity = {"platform": "here"}
    good = metadata(data, "k" * 32, identity)
    archive.check_metadata(good, "k" * 32, identity, Limits())
    unsigned = {name: value for name, value in good.items() if name != archive.META_SIGNATURE}
    with pytest.raises(ArchiveRefused, match="it is not signed"):
        archive.check_metadata(unsigned, "k" * 32, identity, Limits())
    with pytest.raises(ArchiveRefused, match="it declares 10000000 members, more than the 250000 a node accepts"):
        archive.check_metadata(metadata(data, "k" * 32, identity, members=10_000_000), "k" * 32, identity, Limits())


def test_sharing_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    def start(*flags: str, **variables: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "poltergust.async_worker", "--path", str(tmp_path / "pipeline"),
                               "--data-dir", str(tmp_path / "data"), "--share-environments", *flags],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **variables})

    started = start()
    assert started.returncode == 2
    assert "--share-environments needs --share-environments-key-env NAME" in started.stderr
    started = start("--share-environments-key-env", "FLEET_KEY", FLEET_KEY="short")
    assert started.returncode == 2
    assert "the variable FLEET_KEY is too short; it must hold a key of at least 16 characters" in started.stderr
    assert "short" not in started.stderr.replace("too short", ""), "the key itself is never shown"
    with pytest.raises(ValueError, match="sharing environments needs a signing key"):
        Environments(tmp_path / "envs", share=True)


# -- on a real node ---------------------------------------------------------------------------


def environment_yaml(wheelhouse: Path, name: str) -> str:
    lines = ["--no-index", f"--find-links {WHEELHOUSE}", f"--find-links {wheelhouse}", "luigi", "poltergust-testpipes"]
    return f"virtualenv:\n  prompt: {name}\ndependencies:\n" + "".join(f"  - {json.dumps(line)}\n" for line in lines)


@pytest.mark.parametrize("backend", ["gcs"], indirect=True)
def test_a_node_refuses_hostile_archives_builds_instead_and_writes_nothing_outside(
    start_node, bucket, wheelhouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_VARIABLE, SECRET.decode())
    envs = tmp_path / "box" / "envs"
    marker = tmp_path / "pwned-by-pth"
    version = "%d.%d" % sys.version_info[:2]
    poison = [  # code any Python started from the environment would run at once
        file("pyvenv.cfg", f"home = {os.path.dirname(INTERPRETER)}\ninclude-system-site-packages = false\n".encode()),
        directory("lib"), directory(f"lib/python{version}"), directory(f"lib/python{version}/site-packages"),
        file(f"lib/python{version}/site-packages/poison.pth", f"import os; open({str(marker)!r}, 'w')\n".encode()),
    ]
    attacks = {
        # name: (members, metadata changes, the refusal the run log must give)
        "chain": ([link("d", "."), link("d/up", ".."), link("up/up2", ".."), file("up/up2/pwned", b"x")], {},
                  "its member 'd/up' passes through 'd', which is not a directory"),
        "oversize": ([file("big", bytes(4 << 20))], {"unpacked": 1000}, "it unpacks to more bytes than it declares"),
        "members": ([file(f"f{i}", b"x") for i in range(200)], {"members": 50},
                    "it holds more members than it declares"),
        "huge": ([], {"members": 10_000_000}, "it declares 10000000 members, more than the 250000 a node accepts"),
        "unsigned": ([], {"unsigned": True}, "it is not signed"),
        "forged": ([], {"secret": b"a key that is not the fleet's"},
                   "its signature does not match (made with another key, or altered since)"),
    }
    start_node("node-a", "--env-dir", str(envs), "--share-environments", "--share-environments-key-env",
               KEY_VARIABLE, "--max-concurrent", str(len(attacks)))
    archives = {}
    for name, (members, changes, _) in attacks.items():
        text = environment_yaml(wheelhouse, name)
        spec = parse_environment(text.encode(), bucket.url(f"environment/{name}.yaml"))
        interpreter = plan.find_interpreter(spec, os.environ)
        key = plan.key(spec, interpreter)
        manifest = {"key": key, "identity": interpreter.identity(), "python": interpreter.describe()}
        data = tar_of(*venv(*poison, *members, manifest=manifest))
        meta = metadata(data, key, interpreter.identity(), secret=changes.get("secret", SECRET),
                        members=changes.get("members"), unpacked=changes.get("unpacked"))
        if changes.get("unsigned"):
            del meta[archive.META_SIGNATURE]
        archives[name] = (f"environment/{name}.env/{key}.tar.gz", key, interpreter.identity())
        bucket.upload(archives[name][0], data, metadata=meta)
        bucket.upload(f"environment/{name}.yaml", text)
        config = {"environment": bucket.url(f"environment/{name}.yaml"),
                  "task": {"name": "Touch", "module": "poltergust_testpipes", "out-dir": str(tmp_path / "out" / name),
                           "variable": KEY_VARIABLE}}
        bucket.upload(f"pipeline/{name}.config.yaml", yaml.safe_dump(config))

    for name, (_, _, refusal) in attacks.items():
        wait_for(lambda: bucket.exists(f"pipeline/{name}.done.yaml") or bucket.exists(f"pipeline/{name}.error.yaml"),
                 180, f"{name} to finish")
        assert bucket.exists(f"pipeline/{name}.done.yaml"), bucket.read(f"pipeline/{name}.error.yaml")
        log = "".join(p.read_text() for p in (tmp_path / "node-a" / "logs").glob(f"{name}.*.log"))
        assert f"not using the shared archive {bucket.url(archives[name][0])}: {refusal}; building instead" in log
        assert "building environment" in log
        assert (tmp_path / "out" / name / "touch.txt").read_text() == "node-a\n\n", "the key stays with the node"

    assert not marker.exists(), "nothing from a refused archive ever ran"
    box = tmp_path / "box"
    assert [p.name for p in box.iterdir()] == ["envs"] and not (tmp_path / "pwned").exists()
    assert not list(tmp_path.rglob("pwned")) and not list(tmp_path.rglob("up2"))
    assert sorted(p.name for p in envs.iterdir() if not p.name.startswith(".")) == sorted(
        key for _, key, _ in archives.values()), "the built environments, nothing else"
    assert not [p for p in envs.iterdir() if p.name.startswith(".build-")], "refused archives leave nothing"

    def replaced(name: str) -> bool:
        """The node's own archive, signed with the fleet's key, replaced the hostile one."""
        object_name, key, identity = archives[name]
        meta = (bucket.stat(object_name) or {}).get("metadata", {})
        if not meta.get(archive.META_SIGNATURE):
            return False
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(bucket.read(object_name))
        try:
            archive.check_file(path, meta, key, identity, SECRET)
        except ArchiveRefused:
            return False
        return True

    for name in attacks:
        wait_for(lambda: replaced(name), 120, f"the node to replace the {name} archive with its own")
