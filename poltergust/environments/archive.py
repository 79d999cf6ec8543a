"""Archives of built environments: pack, sign, check and unpack (the bytes; `share` moves them).

    gs://B/environment/NAME.yaml                     the environment file
    gs://B/environment/NAME.env/KEY.tar.gz           its built environment, one per key

An archive is a gzipped tar of the environment, and the object's metadata
records its key, the builder's interpreter identity, its size, SHA-256,
member count and unpacked size, and an HMAC-SHA256 signature over all of
those and the archive's bytes, made with a key only nodes hold. Object
metadata is written by whoever uploads, so nothing in it is believed unless
the signature proves a node wrote it.

A node only unpacks an archive that is signed with its own key and made for
its own key and identity, and then as untrusted data all the same (the
semantics of tarfile's `data` filter, implemented here for every Python the
node runs on): every member must land inside the destination, through real
directories only, never through a link; links must resolve inside it; only
files, directories and links; no set-id bits; at most the member count and
unpacked size the signed metadata declares, and never more than `Limits`.
The interpreter links (`bin/python*`) are made anew to this node's
interpreter rather than taken from the archive, and nothing from the archive
runs while it is unpacked.
"""
from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from poltergust.errors import PoltergustError

SKIPPED_DIRECTORIES = {"__pycache__"}
"""Byte code is written by whoever imports first; it is rebuilt on demand, so not shipped."""

META_KEY = "poltergust-key"
META_SHA256 = "poltergust-sha256"
META_SIZE = "poltergust-size"
META_IDENTITY = "poltergust-identity"
META_PYTHON = "poltergust-python"
META_MEMBERS = "poltergust-members"
META_UNPACKED = "poltergust-unpacked-size"
META_SIGNATURE = "poltergust-signature"

INTERPRETER_LINK = re.compile(r"bin/(python|pypy)\d*(\.\d+)?[tw]?")
"""The links to the interpreter a virtualenv holds: made anew on each node, never taken from an archive."""
CHUNK = 1 << 20
MAX_READ = 8 << 20
"""No legitimate tar header needs more; a larger read is a header built to exhaust memory."""


@dataclass(frozen=True)
class Limits:
    """What a node accepts from any archive, whatever its metadata says."""

    download: int = 8 << 30
    """Bytes of the archive itself."""
    unpacked: int = 32 << 30
    """Bytes of all its files together."""
    members: int = 250_000
    """Files, directories and links."""


class ArchiveRefused(PoltergustError):
    """An archive must not be used (unsigned, corrupt, foreign, hostile); the message says why."""


class SecretInEnvironment(PoltergustError):
    """A file of the environment holds a secret value: the environment is not shared."""


@dataclass(frozen=True)
class Packed:
    data: bytes
    sha256: str
    members: int
    unpacked: int
    """Bytes of its files together."""


def identity_digest(identity: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def signer(secret: bytes, key: str, identity: Mapping[str, object], members: int, unpacked: int) -> hmac.HMAC:
    """An HMAC-SHA256 over what the metadata claims; feed it the archive's bytes."""
    claims = f"poltergust-archive-1\n{key}\n{identity_digest(identity)}\n{members}\n{unpacked}\n"
    return hmac.new(secret, claims.encode(), hashlib.sha256)


def metadata_for(packed: Packed, key: str, identity: Mapping[str, object], python: str,
                 secret: bytes) -> dict[str, str]:
    signature = signer(secret, key, identity, packed.members, packed.unpacked)
    signature.update(packed.data)
    return {
        META_KEY: key, META_SHA256: packed.sha256, META_SIZE: str(len(packed.data)),
        META_IDENTITY: identity_digest(identity), META_PYTHON: python[:500], META_MEMBERS: str(packed.members),
        META_UNPACKED: str(packed.unpacked), META_SIGNATURE: signature.hexdigest(),
    }


def check_metadata(metadata: Mapping[str, str], key: str, identity: Mapping[str, object], limits: Limits) -> None:
    """Refuse, before downloading it, an archive that is unsigned, made for another key or machine, or too big."""
    if not metadata.get(META_SHA256) or not metadata.get(META_SIZE):
        raise ArchiveRefused("its metadata has no checksum (an unfinished or foreign upload)")
    if not metadata.get(META_SIGNATURE):
        raise ArchiveRefused("it is not signed")
    if metadata.get(META_KEY) != key:
        raise ArchiveRefused(f"it was made for environment {metadata.get(META_KEY) or '?'}")
    if metadata.get(META_IDENTITY) != identity_digest(identity):
        raise ArchiveRefused(f"it was built for another interpreter or platform ({metadata.get(META_PYTHON) or '?'})")
    for field, limit, what in ((META_SIZE, limits.download, "bytes"), (META_MEMBERS, limits.members, "members"),
                               (META_UNPACKED, limits.unpacked, "unpacked bytes")):
        declared = _number(metadata, field)
        if declared > limit:
            raise ArchiveRefused(f"it declares {declared} {what}, more than the {limit} a node accepts")


def check_file(path: Path, metadata: Mapping[str, str], key: str, identity: Mapping[str, object],
               secret: bytes) -> None:
    """Refuse a downloaded archive whose bytes are not the ones recorded and signed by a node."""
    size = path.stat().st_size
    if str(size) != metadata.get(META_SIZE):
        raise ArchiveRefused(f"it is corrupt: {size} bytes, the uploader recorded {metadata.get(META_SIZE)}")
    digest = hashlib.sha256()
    signature = signer(secret, key, identity, _number(metadata, META_MEMBERS), _number(metadata, META_UNPACKED))
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
            signature.update(chunk)
    if digest.hexdigest() != metadata.get(META_SHA256):
        raise ArchiveRefused("it is corrupt: its SHA-256 does not match the one the uploader recorded")
    if not hmac.compare_digest(signature.hexdigest(), metadata.get(META_SIGNATURE, "")):
        raise ArchiveRefused("its signature does not match (made with another key, or altered since)")


def _number(metadata: Mapping[str, str], field: str) -> int:
    try:
        return int(metadata.get(field, ""))
    except ValueError:
        raise ArchiveRefused(f"its metadata has no valid {field}") from None


def pack(root: Path, secrets: Iterable[str] = (), level: int = 3) -> Packed:
    """Tar and gzip the environment at `root` (paths relative to it).

    Raises SecretInEnvironment when any file holds one of `secrets`.
    """
    needles = [s.encode() for s in secrets if s]
    buffer = io.BytesIO()
    members = unpacked = 0
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
                    unpacked += info.size
                elif info.issym() or info.islnk():
                    tar.addfile(info)
                else:
                    continue
                members += 1
            for name in subdirectories:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    tar.addfile(tar.gettarinfo(path, os.path.normpath(os.path.join(relative_directory, name))))
                    members += 1
    data = buffer.getvalue()
    return Packed(data, hashlib.sha256(data).hexdigest(), members, unpacked)


def unpack(archive: Path, destination: Path, interpreter: str, metadata: Mapping[str, str], limits: Limits) -> None:
    """Unpack `archive` into the new directory `destination` as untrusted data (see the module's docstring).

    At most the members and unpacked bytes `metadata` declares (and `limits`
    allows) are accepted; `bin/python*` links are made to `interpreter`.
    """
    members_allowed = min(_number(metadata, META_MEMBERS), limits.members)
    bytes_allowed = min(_number(metadata, META_UNPACKED), limits.unpacked)
    destination.mkdir(mode=0o755, parents=True)
    try:
        with gzip.open(archive, "rb") as stream:
            bounded = _Bounded(stream, bytes_allowed + (members_allowed + 10) * 4096)
            with tarfile.open(fileobj=bounded, mode="r:") as tar:
                _Extraction(tar, destination, interpreter, members_allowed, bytes_allowed).run()
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise ArchiveRefused(f"it cannot be unpacked: {exc}") from None


class _Bounded(io.RawIOBase):
    """The decompressed tar stream, refused past `budget` bytes or on a read built to exhaust memory."""

    def __init__(self, stream: gzip.GzipFile, budget: int) -> None:
        super().__init__()
        self._stream = stream
        self._budget = budget

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._stream.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.tell() + offset if whence == os.SEEK_CUR else -1
        if not 0 <= target <= self._budget:
            raise ArchiveRefused(f"it unpacks to more than it declares ({self._budget} bytes with headers)")
        return self._stream.seek(target)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ:
            raise ArchiveRefused(f"it holds a header of {size} bytes, more than any real one")
        if self.tell() + size > self._budget:
            raise ArchiveRefused(f"it unpacks to more than it declares ({self._budget} bytes with headers)")
        return self._stream.read(size)


class _Extraction:
    """One pass over the members, each checked and written as it comes (never through a link)."""

    def __init__(self, tar: tarfile.TarFile, destination: Path, interpreter: str, members: int,
                 unpacked: int) -> None:
        self.tar = tar
        self.root = str(destination)
        self.interpreter = interpreter
        self.members_left = members
        self.bytes_left = unpacked
        self.links: list[str] = []

    def run(self) -> None:
        while True:
            member = self.tar.next()
            if member is None:
                break
            self.tar.members.clear()  # type: ignore[attr-defined]  # one member at a time: the count is bounded, memory too
            self.members_left -= 1
            if self.members_left < 0:
                raise ArchiveRefused("it holds more members than it declares")
            self._extract(member)
        for name in self.links:  # links made early must not point outside through links made later
            self._inside(os.path.realpath(os.path.join(self.root, name)), f"its link {name!r}")
        python = os.path.join(self.root, "bin", "python")
        if not os.path.islink(python) or os.path.realpath(python) != os.path.realpath(self.interpreter):
            raise ArchiveRefused("its bin/python is not a link to the interpreter")

    def _extract(self, member: tarfile.TarInfo) -> None:
        name = member.name
        if (not name or name.startswith("/") or "\\" in name or "\0" in name
                or posixpath.normpath(name) != name or ".." in name.split("/") or name == "."):
            raise ArchiveRefused(f"it holds the unsafe path {name!r}")
        if member.mode & (stat.S_ISUID | stat.S_ISGID):
            raise ArchiveRefused(f"it holds {name!r} with a set-id bit")
        parent = self._parent(name)
        target = os.path.join(parent, posixpath.basename(name))
        if INTERPRETER_LINK.fullmatch(name):
            self._interpreter_link(member, target)
        elif member.isdir():
            self._directory(name, target)
        elif member.issym():
            self._symlink(member, parent, target)
        elif member.islnk():
            source = os.path.join(self._parent(member.linkname, create=False), posixpath.basename(member.linkname))
            if not stat.S_ISREG(os.lstat(source).st_mode):
                raise ArchiveRefused(f"its hard link {name!r} does not point to a file of the archive")
            os.link(source, target, follow_symlinks=False)
        elif member.isreg() and not member.issparse():
            self._file(member, target)
        else:
            raise ArchiveRefused(f"it holds {name!r}, which is not a file, directory or link")

    def _parent(self, name: str, create: bool = True) -> str:
        """The real directory `name` lands in: every step a directory of the archive, never a link."""
        if posixpath.normpath(name) != name or name.startswith("/") or ".." in name.split("/"):
            raise ArchiveRefused(f"it refers to the unsafe path {name!r}")
        path = self.root
        for part in name.split("/")[:-1]:
            path = os.path.join(path, part)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not create:
                    raise ArchiveRefused(f"it refers to {name!r}, which is not in it") from None
                os.mkdir(path, 0o755)
                continue
            if not stat.S_ISDIR(mode):
                raise ArchiveRefused(f"its member {name!r} passes through {part!r}, which is not a directory")
        return path

    def _directory(self, name: str, target: str) -> None:
        try:
            os.mkdir(target, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                raise ArchiveRefused(f"it holds {name!r} twice") from None

    def _symlink(self, member: tarfile.TarInfo, parent: str, target: str) -> None:
        link = member.linkname
        if not link or link.startswith("/") or "\0" in link:
            raise ArchiveRefused(f"its link {member.name!r} points outside the environment ({link})")
        self._inside(os.path.realpath(os.path.join(parent, link)), f"its link {member.name!r}")
        os.symlink(link, target)
        self.links.append(member.name)

    def _interpreter_link(self, member: tarfile.TarInfo, target: str) -> None:
        """`bin/python` -> this node's interpreter; `bin/python3` and such -> a sibling, as in the archive."""
        link = member.linkname
        if not member.issym() or not (link.startswith("/") or INTERPRETER_LINK.fullmatch(f"bin/{link}")):
            raise ArchiveRefused(f"its {member.name} is not a link to the interpreter")
        os.symlink(self.interpreter if link.startswith("/") else link, target)

    def _file(self, member: tarfile.TarInfo, target: str) -> None:
        self.bytes_left -= member.size
        if self.bytes_left < 0:
            raise ArchiveRefused("it unpacks to more bytes than it declares")
        source = self.tar.extractfile(member)
        assert source is not None
        mode = member.mode & 0o755 | 0o600
        if not mode & 0o100:
            mode &= ~0o111
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                handle.write(chunk)
            os.fchmod(handle.fileno(), mode)
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)

    def _inside(self, path: str, what: str) -> None:
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, path]) != real_root:
            raise ArchiveRefused(f"{what} points outside the environment")
