"""Archives of built environments: pack, check and unpack (the bytes; `share` moves them).

After building an environment a node may upload it as a gzipped tar beside the
environment file:

    gs://B/environment/NAME.yaml                     the environment file
    gs://B/environment/NAME.env/KEY.tar.gz           its built environment, one per key

The key already covers the file's content, the interpreter and the platform,
so a node only ever asks for the archive of its own key. Every archive is
still checked before use: the object's metadata records the archive's SHA-256,
size, key and the builder's interpreter identity, and the archive holds the
environment's manifest (`.poltergust.json`). A node uses an archive only when
the checksum matches the bytes it downloaded and both the metadata and the
manifest name its own key and identity; anything else (a truncated upload, a
foreign platform, a tampered manifest) is refused and the node builds instead,
then replaces the archive with its own.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .cache import MANIFEST

SKIPPED_DIRECTORIES = {"__pycache__"}
"""Byte code is written by whoever imports first; it is rebuilt on demand, so not shipped."""

META_KEY = "poltergust-key"
META_SHA256 = "poltergust-sha256"
META_SIZE = "poltergust-size"
META_IDENTITY = "poltergust-identity"
META_PYTHON = "poltergust-python"


class ArchiveRefused(Exception):
    """An archive must not be used (corrupt, foreign, tampered); the message says why."""


class SecretInEnvironment(Exception):
    """A file of the environment holds a secret value: the environment is not shared."""


@dataclass(frozen=True)
class Packed:
    data: bytes
    sha256: str
    files: int


def identity_digest(identity: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def metadata_for(packed: Packed, key: str, identity: Mapping[str, object], python: str) -> dict[str, str]:
    return {
        META_KEY: key, META_SHA256: packed.sha256, META_SIZE: str(len(packed.data)),
        META_IDENTITY: identity_digest(identity), META_PYTHON: python[:500],
    }


def check_metadata(metadata: Mapping[str, str], key: str, identity: Mapping[str, object]) -> None:
    """Refuse an archive whose object metadata is missing or made for another key or machine."""
    if not metadata.get(META_SHA256) or not metadata.get(META_SIZE):
        raise ArchiveRefused("its metadata has no checksum (an unfinished or foreign upload)")
    if metadata.get(META_KEY) != key:
        raise ArchiveRefused(f"it was made for environment {metadata.get(META_KEY) or '?'}")
    if metadata.get(META_IDENTITY) != identity_digest(identity):
        raise ArchiveRefused(f"it was built for another interpreter or platform ({metadata.get(META_PYTHON) or '?'})")


def check_data(data: bytes, metadata: Mapping[str, str]) -> None:
    """Refuse bytes whose size or SHA-256 differ from what the uploader recorded."""
    if str(len(data)) != metadata.get(META_SIZE):
        raise ArchiveRefused(f"it is corrupt: {len(data)} bytes, the uploader recorded {metadata.get(META_SIZE)}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != metadata.get(META_SHA256):
        raise ArchiveRefused("it is corrupt: its SHA-256 does not match the one the uploader recorded")


def pack(root: Path, secrets: Iterable[str] = (), level: int = 3) -> Packed:
    """Tar and gzip the environment at `root` (paths relative to it).

    Raises SecretInEnvironment when any file holds one of `secrets`.
    """
    needles = [s.encode() for s in secrets if s]
    buffer = io.BytesIO()
    files = 0
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=level, format=tarfile.PAX_FORMAT) as tar:
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
            relative_directory = os.path.relpath(directory, root)
            for name in sorted(names) + [d for d in subdirectories if os.path.islink(os.path.join(directory, d))]:
                path = os.path.join(directory, name)
                arcname = os.path.normpath(os.path.join(relative_directory, name))
                info = tar.gettarinfo(path, arcname)
                if info.isreg():
                    with open(path, "rb") as handle:
                        content = handle.read()
                    if any(needle in content for needle in needles):
                        raise SecretInEnvironment(f"{arcname} holds a secret value")
                    tar.addfile(info, io.BytesIO(content))
                    files += 1
                elif info.issym() or info.islnk():
                    tar.addfile(info)
            for name in subdirectories:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    tar.addfile(tar.gettarinfo(path, os.path.normpath(os.path.join(relative_directory, name))))
    data = buffer.getvalue()
    return Packed(data, hashlib.sha256(data).hexdigest(), files)


def unpack(data: bytes, destination: Path, allowed_link_prefix: str) -> dict[str, object]:
    """Unpack an archive into the new directory `destination`; returns its manifest.

    Only regular files, directories and links are accepted; every name must stay
    inside `destination`, and absolute symbolic links (the interpreter) must
    point under `allowed_link_prefix`.
    """
    destination.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, allowed_link_prefix)
            if hasattr(tarfile, "fully_trusted_filter"):  # checked above, with stricter link rules
                tar.extractall(destination, members=members, filter="fully_trusted")
            else:
                tar.extractall(destination, members=members)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArchiveRefused(f"it cannot be unpacked: {exc}") from None
    try:
        return json.loads((destination / MANIFEST).read_text())
    except (OSError, ValueError):
        raise ArchiveRefused(f"it has no readable {MANIFEST}") from None


def _check_member(member: tarfile.TarInfo, allowed_link_prefix: str) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        raise ArchiveRefused(f"it holds the unsafe path {name!r}")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise ArchiveRefused(f"it holds {name!r}, which is not a file, directory or link")
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise ArchiveRefused(f"it holds {name!r} with a set-id bit")
    if member.issym():
        target = member.linkname
        if target.startswith("/"):
            prefix = allowed_link_prefix.rstrip("/") + "/"
            if not os.path.normpath(target).startswith(prefix):
                raise ArchiveRefused(f"its link {name!r} points outside the interpreter ({target})")
        elif posixpath.normpath(posixpath.join(posixpath.dirname(name), target)).startswith(".."):
            raise ArchiveRefused(f"its link {name!r} points outside the environment ({target})")
    if member.islnk() and (member.linkname.startswith("/") or ".." in Path(member.linkname).parts):
        raise ArchiveRefused(f"its hard link {name!r} points outside the environment")
