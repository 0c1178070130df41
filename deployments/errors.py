"""Errors a client can see, each with its HTTP status, gRPC code and OpenAI error body, and the
mapping from everything the layers below may raise (typed engine errors, Ray/Serve errors)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from cluster.errors import InvalidSamplingParamsError, PromptTooLongError, RequestError

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray hops intact
        return type(self), (self.message, self.param, self.retry_after_s)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class BadRequest(APIError):
    status, grpc_code, error_type = 400, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"


class Unauthorized(APIError):
    status, grpc_code, error_type = 401, grpc.StatusCode.UNAUTHENTICATED, "authentication_error"


class NotFound(APIError):
    status, grpc_code, error_type = 404, grpc.StatusCode.NOT_FOUND, "not_found_error"


class PayloadTooLarge(APIError):
    status, grpc_code, error_type = 413, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error"


class Overloaded(APIError):
    status, grpc_code, error_type = 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error"


class Unavailable(APIError):
    status, grpc_code, error_type = 503, grpc.StatusCode.UNAVAILABLE, "service_unavailable"


class DeadlineExceeded(APIError):
    status, grpc_code, error_type = 504, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout"


def unwrap(exc: BaseException) -> BaseException:
    """The exception a remote replica raised, out of Ray's RayTaskError wrapper."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def replica_lost(exc: BaseException) -> bool:
    """Whether a call failed because the replica running it died or cannot be reached (the call's
    work is lost with it; another replica can take it)."""
    from ray.exceptions import RayActorError

    return isinstance(unwrap(exc), RayActorError)


def request_error(exc: RequestError, param: str | None = None) -> BadRequest:
    """A typed engine refusal as a 400; the parameter is named where the error type tells it."""
    message = str(exc)
    if param is None:
        if isinstance(exc, InvalidSamplingParamsError):
            param = message.split(" ", 1)[0].rstrip(":")
        elif isinstance(exc, PromptTooLongError):
            param = "prompt"
        else:
            param = getattr(exc, "field", None)
    return BadRequest(message, param)


def to_api_error(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """Maps anything raised while serving a request; unknown errors are logged and become 500s."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from cluster.engine.async_engine import EngineDeadError

    exc = unwrap(exc)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return request_error(exc)
    if isinstance(exc, BackPressureError):
        return Overloaded("the model is at capacity; retry later", retry_after_s=retry_after_s)
    if isinstance(exc, DeploymentUnavailableError | RayActorError | EngineDeadError):
        return Unavailable(f"the model is unavailable: {exc}", retry_after_s=retry_after_s)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return DeadlineExceeded("the request timed out")
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError(f"internal error: {type(exc).__name__}")
