"""The network guard of a MetaDrive worker process: every internet connection fails loudly.

Kept free of torch and of other drivepriv imports: it runs in the worker processes.
"""

from __future__ import annotations

from typing import Any


class NetworkForbiddenError(RuntimeError):
    """Raised in a MetaDrive worker by any attempt to reach the network."""


def _forbid_network() -> None:
    """Make every internet connection or URL download in this process fail loudly.

    drivepriv's workers never need the network; this turns a silent hang or a slow DNS
    failure (MetaDrive's asset download) into an immediate, explicit error.
    """
    import socket
    import urllib.request

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise NetworkForbiddenError(f"drivepriv's MetaDrive worker never uses the network (attempted with {args[:2]!r})")

    original_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original_connect(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]
    urllib.request.urlretrieve = refuse  # type: ignore[assignment]
    urllib.request.urlopen = refuse  # type: ignore[assignment]
