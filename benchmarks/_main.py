"""The scaffold every benchmark script's main() shares: a work directory, everything started stopped on any exit
(Ctrl-C and SIGTERM included), where the logs are on failure, then the report printed and written into its section.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _procs import stop_all
from _report import write_section


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(script: str, args: argparse.Namespace, argv: Sequence[str] | None,
                  measure: Callable[[Path, str], str], *, readme: Path, heading: str, prefix: str,
                  append: bool = True) -> int:
    """Run `measure(workdir, command)` for the report's text, print it and write it into `heading`'s section.

    The file is `--markdown`, else `readme` unless `--quick`; `append` as in `write_section`. The work
    directory is `--workdir`, else a temporary one named `prefix...`, removed at the end.
    """
    command = shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])
    markdown = args.markdown or (None if args.quick else readme)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it is ignored in background jobs of a shell
        signal.signal(sig, interrupted)
    temporary = None if args.workdir else tempfile.TemporaryDirectory(prefix=prefix)
    root = (args.workdir or Path(temporary.name)).resolve()  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    try:
        text = measure(root, command)
    except BaseException:
        log(f"failed; logs are in {root / 'logs'}" + (" (removed)" if temporary else ""))
        raise
    finally:
        stop_all()
        if temporary is not None:
            temporary.cleanup()
    print(text)
    if markdown is not None:
        write_section(markdown, heading, text, append=append)
        log(f"written to {markdown}")
    return 0


def entry(main: Callable[[], int]) -> None:
    """`if __name__ == "__main__"` of a benchmark: exit with main's status, 130 after an interruption."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        sys.exit(130)
