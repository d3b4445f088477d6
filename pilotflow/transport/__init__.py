"""Run a command and move files on a resource: this machine, or a login node over SSH.

``connect(resource)`` gives the transport a resource needs; backends and the run machinery
only see :class:`Transport`.
"""

from __future__ import annotations

from pilotflow.transport.base import RETRY_DELAYS, Result, Transport, run_checked

__all__ = ["RETRY_DELAYS", "Result", "Transport", "connect", "run_checked"]


def connect(resource) -> Transport:
    """The transport for a resource: SSH when it has a host, else this machine."""
    if resource.host:
        from pilotflow.transport.ssh import SshTransport
        return SshTransport.for_resource(resource)
    from pilotflow.transport.local import LocalTransport
    return LocalTransport()
