"""The one harness of the tests and the benchmarks: servers, buckets, nodes, a proxy, waits, runs.

Test modules and benchmarks import shared helpers from here only, never from one another:

- `servers`: the Pub/Sub emulator, fake-gcs-server, luigid, nodes (`Node.launch`) and the dashboard,
  as child processes
- `node_init`: deploy/node-init.sh run dry
- `buckets`: a bucket on the emulator, or a local directory, read independently of the code under test
- `proxy`: one HTTP proxy that counts, holds back or fails requests
- `waits`: `wait_for` a condition, free ports, processes left behind
- `runs`: `submit` a config, wait for its `result`, read run logs and /metrics
- `markdown`: the tables the benchmarks print
- `luigi_examples`: luigi's own examples, packaged as a wheel
"""
from harness.buckets import Bucket, LocalBucket, latest_log
from harness.proxy import Fault, Faults, GatedProxy, Proxy, kind, luigid_call
from harness.runs import (
                          TIMEOUT,
                          get_in_task,
                          offline,
                          pipe_task,
                          poltergust,
                          result,
                          results,
                          run_log,
                          run_logs,
                          scrape,
                          submit,
)
from harness.servers import (
                          PROJECT,
                          ROOT,
                          TOPIC,
                          WHEELHOUSE,
                          Dashboard,
                          FakeGcs,
                          Luigid,
                          Node,
                          PubSubEmulator,
                          Server,
                          resource_totals,
)
from harness.waits import alive, free_port, http_ok, leftovers, port_open, wait_for

__all__ = [
    "Bucket", "LocalBucket", "latest_log", "Fault", "Faults", "GatedProxy", "Proxy", "kind", "luigid_call", "TIMEOUT",
    "get_in_task", "offline", "pipe_task", "poltergust", "result", "results", "run_log", "run_logs", "scrape", "submit",
    "PROJECT", "ROOT", "TOPIC", "WHEELHOUSE", "Dashboard", "FakeGcs", "Luigid", "Node", "PubSubEmulator", "Server",
    "resource_totals", "alive", "free_port", "http_ok", "leftovers", "port_open", "wait_for",
]
