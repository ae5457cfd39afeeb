"""Python clients for Breakwater's control plane, over its JSON port.

``breakwater.langgraph.BreakwaterSaver`` is a LangGraph checkpointer that
keeps a graph's threads in the control plane (it needs the ``langgraph``
extra). The errors every call may raise are in ``breakwater.errors``.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402 (the version comes first: submodules read it)
    BreakwaterError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthorized,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "BreakwaterError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
    "__version__",
]
