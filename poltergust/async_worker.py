"""Run one Poltergust node: `poltergust node --path gs://BUCKET/pipeline ...` (or `python -m poltergust.async_worker`).

The entry point only: flags are `settings`' business, the node's life is `node`'s.
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

import uvloop

from poltergust.node import log_format
from poltergust.node.lifecycle import serve, take_node_name
from poltergust.settings import parse_settings


def main(argv: Sequence[str] | None = None, prog: str = "python -m poltergust.async_worker") -> int:
    settings, renamed = take_node_name(parse_settings(argv, prog=prog))
    log_format.configure(settings.log_level, settings.node_name, settings.log_format)
    if renamed:
        logging.getLogger("poltergust").warning("%s", renamed)
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
