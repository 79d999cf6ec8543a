"""The embedded luigi central scheduler, for nodes started without --scheduler-url.

The first local node starts a real `luigid` on loopback (state in its data
dir); nodes started later on the same machine find it answering and join it.
The node that started it stops it when it exits. Its configuration is the
fleet's settings merged with the node's `--scheduler-config` file (see
`configuration`); a node joining a luigid already running takes that one as it is.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import AsyncIterator

from poltergust import locks
from poltergust.luigid.configuration import luigid_config

log = logging.getLogger(__name__)

DEFAULT_PORT = 8082


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/task_list?data=%7B%7D", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.asynccontextmanager
async def embedded_scheduler(data_dir: Path, port: int = DEFAULT_PORT, config: str = "") -> AsyncIterator[str]:
    """Yield the URL of a local luigid, started here unless one already answers; `config`: the user's fragment."""
    url = f"http://127.0.0.1:{port}"
    # Nodes starting at the same moment take turns: the first starts luigid, the others find it.
    async with locks.held(Path(tempfile.gettempdir()) / f"poltergust-luigid-{port}.lock"):
        process = None if await asyncio.to_thread(_answers, url) else await _start_luigid(data_dir, port, url, config)
    if process is None:
        log.info("using the luigi scheduler already running at %s%s", url,
                 " (with its own configuration: --scheduler-config applies only to a luigid started here)"
                 if config else "")
        yield url
        return
    try:
        log.info("started a luigi scheduler at %s (its web page too; log in %s)", url, data_dir / "luigid")
        yield url
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            await process.wait()


async def _start_luigid(data_dir: Path, port: int, url: str, config: str) -> asyncio.subprocess.Process:
    state = data_dir / "luigid"
    state.mkdir(parents=True, exist_ok=True)
    (state / "luigi.cfg").write_text(luigid_config(config))
    with (state / "luigid.log").open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "poltergust.luigid",
            "--address", "127.0.0.1", "--port", str(port),
            "--state-path", str(state / "state.pickle"), "--logdir", str(state),
            stdout=output, stderr=output, stdin=asyncio.subprocess.DEVNULL,
            env=dict(os.environ, LUIGI_CONFIG_PATH=str(state / "luigi.cfg")), start_new_session=True,
        )
    deadline = asyncio.get_running_loop().time() + 30
    while not await asyncio.to_thread(_answers, url):
        if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"luigid did not start on port {port}; see {state / 'luigid.log'}")
        await asyncio.sleep(0.1)
    return process
