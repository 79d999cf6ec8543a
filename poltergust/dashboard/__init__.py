"""`poltergust dashboard`: a read-only web view of the pipelines, their runs and logs, and the nodes.

It reads the same buckets or directories the nodes use, through the same
storage code, and never writes to them.
"""
from poltergust.dashboard.app import dashboard_server, serve

__all__ = ["dashboard_server", "serve"]
