"""Sharing built environments through the bucket (`--share-environments`): download, or upload.

After building, a node uploads an archive of the environment beside its file
(`environment/NAME.yaml` -> `environment/NAME.env/KEY.tar.gz`, see `archive`)
in the background, signed with the fleet's key. A node without the
environment downloads that archive to a file (never whole into memory) and
unpacks it instead of building, only when it is signed with the same key and
made for the same key and identity, and then as untrusted data (see
`archive`). Anything wrong with an archive makes the node build instead (and
replace the archive with its own), saying why in the run's log; sharing never
fails a run.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from poltergust.config import EnvironmentSpec
from poltergust.environments.archive import (
    META_SIZE,
    ArchiveRefused,
    Limits,
    SecretInEnvironment,
    check_file,
    check_metadata,
    metadata_for,
    pack,
    unpack,
)
from poltergust.environments.cache import Cache, disk_usage
from poltergust.environments.interpreters import Interpreter
from poltergust.layout import archive_name, split_url
from poltergust.run.log import RunLog
from poltergust.storage import NotFound, StorageError, open_store

log = logging.getLogger(__name__)


def archive_location(spec: EnvironmentSpec, key: str) -> tuple[str, str]:
    """(bucket URL, object name) of the archive of `key` built from `spec`; ValueError if not in a bucket."""
    bucket, name = split_url(spec.source)
    return bucket, archive_name(name, key)


class Sharing:
    def __init__(self, cache: Cache, secrets: Callable[[EnvironmentSpec], list[str]], signing_key: bytes) -> None:
        self.cache = cache
        self._secrets = secrets
        self._signing_key = signing_key
        self.limits = Limits()
        self._background: dict[asyncio.Task[None], str] = {}

    async def download(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path,
                       runlog: RunLog) -> bool:
        """Use the shared archive of `key` if there is a good one; False: build instead."""
        try:
            bucket, name = archive_location(spec, key)
        except ValueError:
            return False
        url = f"{bucket}/{name}"
        store = open_store(bucket)
        download = self.cache.staging(key)
        staging = self.cache.staging(key)
        started = time.monotonic()
        identity = interpreter.identity()
        try:
            try:
                info = await store.stat(name)
            except NotFound:
                runlog.note(f"no shared archive {url} yet")
                return False
            check_metadata(info.metadata, key, identity, self.limits)
            download.mkdir(mode=0o700)
            archive = download / "archive.tar.gz"
            size = await store.read_to(name, archive, info.generation, int(info.metadata[META_SIZE]))
            if size > int(info.metadata[META_SIZE]):
                raise ArchiveRefused(f"it is larger than the {info.metadata[META_SIZE]} bytes its metadata records")
            await asyncio.to_thread(check_file, archive, info.metadata, key, identity, self._signing_key)
            await asyncio.to_thread(unpack, archive, staging, interpreter.path, info.metadata, self.limits)
            try:
                manifest = self.cache.read_manifest(staging)
            except (OSError, ValueError):
                raise ArchiveRefused("it has no readable manifest") from None
            if manifest.get("key") != key or manifest.get("identity") != identity:
                raise ArchiveRefused(f"its manifest describes another environment ({manifest.get('python', '?')})")
            manifest.update(source=spec.source, downloaded_from=url, size=await asyncio.to_thread(disk_usage, staging))
            self.cache.write_manifest(staging, manifest)
            self.cache.move_into_place(staging, path)
            runlog.note(f"environment {key} downloaded from {url} ({size / 1e6:.1f} MB) and unpacked "
                        f"in {time.monotonic() - started:.1f}s")
            return True
        except ArchiveRefused as exc:
            runlog.note(f"not using the shared archive {url}: {exc}; building instead")
            return False
        except (StorageError, OSError) as exc:
            runlog.note(f"could not fetch the shared archive {url} ({exc}); building instead")
            return False
        finally:
            await store.close()
            for directory in (download, staging):
                if directory.exists():
                    await asyncio.to_thread(shutil.rmtree, directory, True)

    def start_upload(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path,
                     runlog: RunLog) -> None:
        """Upload the archive of a freshly built environment in the background."""
        try:
            bucket, name = archive_location(spec, key)
        except ValueError:
            return  # not a bucket URL: nowhere to share it
        url = f"{bucket}/{name}"
        runlog.note(f"sharing the environment in the background as {url}")
        task = asyncio.create_task(self._upload(spec, key, interpreter, path, url))
        self._background[task] = url
        task.add_done_callback(lambda done: self._background.pop(done, None))

    async def _upload(self, spec: EnvironmentSpec, key: str, interpreter: Interpreter, path: Path, url: str) -> None:
        await self.cache.hold(key)  # not evicted while being packed
        bucket, name = archive_location(spec, key)
        store = open_store(bucket)
        started = time.monotonic()
        try:
            packed = await asyncio.to_thread(pack, path, self._secrets(spec))
            metadata = metadata_for(packed, key, interpreter.identity(), interpreter.describe(), self._signing_key)
            await store.write(name, packed.data, metadata=metadata, content_type="application/gzip")
            log.info("shared environment %s as %s (%.1f MB, %d members, %.1fs)", key, url, len(packed.data) / 1e6,
                     packed.members, time.monotonic() - started)
        except SecretInEnvironment as exc:
            log.warning("environment %s is not shared: %s", key, exc)
        except Exception as exc:  # noqa: BLE001 -- sharing is best effort; the run goes on regardless
            log.warning("could not share environment %s as %s: %s", key, url, exc)
        finally:
            await store.close()

    async def wait_background(self, timeout: float | None = None) -> None:
        """Wait for the uploads in progress (at most `timeout` seconds), saying which."""
        if not self._background:
            return
        log.info("waiting%s for %d environment archive upload(s): %s",
                 "" if timeout is None else f" up to {timeout:.0f}s",
                 len(self._background), ", ".join(sorted(self._background.values())))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._background:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                log.warning("gave up waiting for environment archive upload(s): %s",
                            ", ".join(sorted(self._background.values())))
                return
            await asyncio.wait(list(self._background), timeout=left)
