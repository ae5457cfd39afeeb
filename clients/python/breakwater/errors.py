"""The errors a Breakwater control plane call can raise.

The JSON API answers a failure as
``{"error": {"code": "NOT_FOUND", "message": "..."}}`` with a matching HTTP
status. The error class is chosen by ``code`` first, and by the HTTP status
when the body has no code (a proxy's answer, say).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BreakwaterError",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
    "from_answer",
]


class BreakwaterError(Exception):
    """A call to the control plane failed.

    ``code`` is the API's error code (such as ``"NOT_FOUND"``), ``status``
    the HTTP status (0 when no answer came), ``message`` the explanation.
    """

    def __init__(self, message: str, *, code: str = "", status: int = 0) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.message = message
        self.code = code
        self.status = status


class NotFound(BreakwaterError):
    """No such thing (404, ``NOT_FOUND``)."""


class InvalidArgument(BreakwaterError):
    """The request is malformed or breaks a limit (400, ``INVALID_ARGUMENT``)."""


class FailedPrecondition(BreakwaterError):
    """The request cannot be served as things are, such as a copy onto a
    thread that has checkpoints (``FAILED_PRECONDITION``)."""


class Unauthorized(BreakwaterError):
    """No token or a wrong one (401, ``UNAUTHENTICATED``)."""


class PermissionDenied(Unauthorized):
    """The token may not do this, such as a change with the read-only token
    (403, ``PERMISSION_DENIED``)."""


class Unavailable(BreakwaterError):
    """The control plane could not be reached, or answered 503
    (``UNAVAILABLE``), after the retries."""


class VersionConflict(BreakwaterError):
    """A compare-and-swap lost (409, ``ABORTED``); ``current_version`` is
    the latest version."""

    def __init__(
        self, message: str, *, code: str = "ABORTED", status: int = 409, current_version: int = 0
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.current_version = current_version


class DataLoss(BreakwaterError):
    """A saga watch fell too far behind and events were dropped
    (``DATA_LOSS``): watch again, and read the sagas' state with ``get``."""


_BY_CODE: dict[str, type[BreakwaterError]] = {
    "NOT_FOUND": NotFound,
    "INVALID_ARGUMENT": InvalidArgument,
    "FAILED_PRECONDITION": FailedPrecondition,
    "UNAUTHENTICATED": Unauthorized,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAVAILABLE": Unavailable,
    "ABORTED": VersionConflict,
    "DATA_LOSS": DataLoss,
}

_CODE_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    503: "UNAVAILABLE",
}


def from_answer(status: int, body: Any) -> BreakwaterError:
    """The error for a failed answer: its HTTP status and its parsed JSON
    body (or ``None`` when the body was not JSON)."""
    detail: dict[str, Any] = {}
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # {"error": {"code", "message"}}: the API's shape
            detail = error
        elif isinstance(error, str):  # {"error": "...", "code": "..."}: tolerated too
            detail = {"message": error, "code": body.get("code", "")}
    code = str(detail.get("code") or _CODE_BY_STATUS.get(status, ""))
    message = str(detail.get("message") or f"the control plane answered HTTP {status}")
    cls = _BY_CODE.get(code, BreakwaterError)
    if cls is VersionConflict:
        current = detail.get("current_version", 0)
        return VersionConflict(
            message,
            code=code,
            status=status,
            current_version=current if isinstance(current, int) else 0,
        )
    return cls(message, code=code, status=status)
