"""Python clients for Breakwater's control plane, over its JSON API.

``Client`` (and ``AsyncClient``) reads and changes checkpoints, dead
letters and sagas. ``breakwater.langgraph.BreakwaterSaver`` is a LangGraph
checkpointer that keeps a graph's threads in the control plane (it needs
the ``langgraph`` extra). The errors every call may raise are in
``breakwater.errors``.
"""

__version__ = "0.1.0"

# The version comes first: submodules read it.
from .client import AsyncClient, Client  # noqa: E402
from .errors import (  # noqa: E402
    BreakwaterError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthorized,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "AsyncClient",
    "BreakwaterError",
    "Client",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
    "__version__",
]
