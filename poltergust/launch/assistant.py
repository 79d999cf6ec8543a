"""A pure assistant: a luigi worker that takes a pipeline's free tasks without scheduling its graph again.

A node that joins a run as a helper starts `ENV/bin/python assistant.py
LUIGI-ARGS...` in the pipeline's environment, with the same arguments as the
starter's `python -m luigi` plus `--assistant`. Plain luigi would add the
whole graph to luigid again (a request per task, per helper, and the root's
dynamic requirements reset each time); this worker only asks for work.
`poltergust.luigid` gives an assistant the pipeline's tasks only, and each
task comes with its module and parameters, which luigi's worker loads.

The root task is built from the arguments (not scheduled) so that its id
can be printed for the node, which watches that task in luigid. A kept-alive
assistant never stops by itself; the node stops it when the pipeline is over.
Should luigi's worker return anyway, the exit code says "nothing run" (never
0, which would read as the pipeline done). Standard library and luigi only:
it runs in the pipeline's environment.
"""
import os
import sys

ROOT_PREFIX = "poltergust assistant of root task "
NOT_RUN = 11
CRASHED = 40


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]  # the directory of this file is not the pipeline's to import from
    import luigi
    from luigi.cmdline_parser import CmdlineParser

    with CmdlineParser.global_instance(argv) as parser:
        print(ROOT_PREFIX + parser.get_task_obj().task_id, flush=True)
        luigi.build([], detailed_summary=True)
    return NOT_RUN


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 -- any crash must read as one, not as "done"
        import traceback

        traceback.print_exc()
        sys.exit(CRASHED)
