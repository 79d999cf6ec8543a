"""Sharing built environments through the bucket (`--share-environments`): download, or upload.

After building, a node uploads an archive of the environment beside its file
(`environment/NAME.yaml` -> `environment/NAME.env/KEY.tar.gz`, see `archive`)
in the background; a node without the environment downloads and unpacks that
archive instead of building, when its checksum, key and identity all match.
Anything wrong with an archive makes the node build instead (and replace the
archive with its own); sharing never fails a run.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from ..config import EnvironmentSpec
from ..layout import archive_name, split_url
from ..runlog import RunLog
from ..storage import NotFound, StorageError, open_store
from .archive import ArchiveRefused, SecretInEnvironment, check_data, check_metadata, metadata_for, pack, unpack
from .cache import Cache, disk_usage
from .interpreters import Interpreter

log = logging.getLogger(__name__)


def archive_location(spec: EnvironmentSpec, key: str) -> tuple[str, str]:
    """(bucket URL, object name) of the archive of `key` built from `spec`; ValueError if not in a bucket."""
    bucket, name = split_url(spec.source)
    return bucket, archive_name(name, key)


class Sharing:
    def __init__(self, cache: Cache, secrets: Callable[[EnvironmentSpec], list[str]]) -> None:
        self.cache = cache
        self._secrets = secrets
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
        staging = self.cache.staging(key)
        started = time.monotonic()
        try:
            try:
                info = await store.stat(name)
            except NotFound:
                runlog.note(f"no shared archive {url} yet")
                return False
            check_metadata(info.metadata, key, interpreter.identity())
            blob = await store.read(name, info.generation)
            check_data(blob.data, blob.info.metadata)
            prefix = os.path.dirname(os.path.dirname(interpreter.path))
            manifest = await asyncio.to_thread(unpack, blob.data, staging, prefix)
            if manifest.get("key") != key or manifest.get("identity") != interpreter.identity():
                raise ArchiveRefused(f"its manifest describes another environment ({manifest.get('python', '?')})")
            check = await asyncio.create_subprocess_exec(str(staging / "bin" / "python"), "-c", "import sys",
                                                         stdout=asyncio.subprocess.DEVNULL,
                                                         stderr=asyncio.subprocess.DEVNULL)
            if await check.wait() != 0:
                raise ArchiveRefused("its python does not run on this node")
            manifest.update(source=spec.source, downloaded_from=url, size=await asyncio.to_thread(disk_usage, staging))
            self.cache.write_manifest(staging, manifest)
            self.cache.move_into_place(staging, path)
            runlog.note(f"environment {key} downloaded from {url} ({len(blob.data) / 1e6:.1f} MB) and unpacked "
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
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

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
            metadata = metadata_for(packed, key, interpreter.identity(), interpreter.describe())
            await store.write(name, packed.data, metadata=metadata, content_type="application/gzip")
            log.info("shared environment %s as %s (%.1f MB, %d files, %.1fs)", key, url, len(packed.data) / 1e6,
                     packed.files, time.monotonic() - started)
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
        log.info("waiting%s for %d environment archive upload(s): %s", "" if timeout is None else f" up to {timeout:.0f}s",
                 len(self._background), ", ".join(sorted(self._background.values())))
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._background:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                log.warning("gave up waiting for environment archive upload(s): %s",
                            ", ".join(sorted(self._background.values())))
                return
            await asyncio.wait(list(self._background), timeout=left)
