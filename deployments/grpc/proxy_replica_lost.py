"""Installed in Ray Serve's proxy beside the gRPC fixes (`proxy_fix.add_stream_cancellation_to_server`):
a call whose ingress replica died (SIGKILL, its node lost) ends with an explicit retryable error
instead of Serve's 500 / INTERNAL, or, for an HTTP stream already started, a connection cut
without a word.

- HTTP before the response started: 503 with Retry-After (Serve's own answer when no replica is
  up), the OpenAI error body.
- HTTP after: the stream's last event is an OpenAI error event (code 503, `service_unavailable`)
  and `[DONE]`, as the ingress itself ends a stream whose engine replica died. The ingress's
  started responses are all SSE streams (a whole JSON answer is sent in one piece).
- gRPC: UNAVAILABLE.

Before any of that, a request that had been sent nothing yet is sent again to another replica
(`proxy_resend.py`, at most twice); these answers are for what cannot be resent.

Only a lost replica (`RayActorError`) changes; every other failure keeps Serve's status. If Serve's
internals differ from the version this was written against, it logs a warning and changes nothing."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from deployments.grpc import proxy_resend

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1
MESSAGE = "the ingress replica serving this request stopped; retry the request"


def _error_json() -> bytes:
    return json.dumps({"error": {"message": MESSAGE, "type": "service_unavailable", "param": None,
                                 "code": 503}}, separators=(",", ":")).encode()


def install(proxy: Any) -> None:
    """Wraps the proxy module's status functions (`proxy` is `ray.serve._private.proxy`)."""
    from ray.exceptions import RayActorError

    names = ("get_http_response_status", "send_http_response_on_exception", "get_grpc_response_status")
    if not all(callable(getattr(proxy, n, None)) for n in names):
        logger.warning("lost-replica statuses not installed: unexpected Serve proxy internals")
        return
    import grpc

    http_status, http_on_exception, grpc_status = (getattr(proxy, n) for n in names)

    def lost(exc: BaseException) -> bool:
        return isinstance(exc, RayActorError) or isinstance(getattr(exc, "cause", None), RayActorError)

    def get_http_response_status(exc: BaseException, *args: Any) -> Any:
        status = http_status(exc, *args)
        if lost(exc) and status.code == 500:
            proxy_resend.note_lost(args[1] if len(args) > 1 else None)
            return dataclasses.replace(status, code=503, message=MESSAGE)
        return status

    def send_http_response_on_exception(status: Any, response_started: bool) -> list[dict[str, Any]]:
        if status.code != 503 or status.message != MESSAGE:
            return http_on_exception(status, response_started)
        if response_started:
            return [{"type": "http.response.body", "body": b"data: " + _error_json() + b"\n\ndata: [DONE]\n\n",
                     "more_body": False}]
        return [{"type": "http.response.start", "status": 503,
                 "headers": [(b"content-type", b"application/json"), (b"retry-after", str(RETRY_AFTER_S).encode())]},
                {"type": "http.response.body", "body": _error_json(), "more_body": False}]

    def get_grpc_response_status(exc: BaseException, *args: Any) -> Any:
        status = grpc_status(exc, *args)
        if lost(exc) and status.code == grpc.StatusCode.INTERNAL:
            proxy_resend.note_lost(args[1] if len(args) > 1 else None)
            return dataclasses.replace(status, code=grpc.StatusCode.UNAVAILABLE, message=MESSAGE)
        return status

    proxy.get_http_response_status = get_http_response_status
    proxy.send_http_response_on_exception = send_http_response_on_exception
    proxy.get_grpc_response_status = get_grpc_response_status

    def failure(request_type: str) -> list[Any]:
        """A lost request's whole answer (then its status), for one that was not started."""
        if request_type == "grpc":
            return [proxy.ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=MESSAGE)]
        status = proxy.ResponseStatus(code=503, is_error=True, message=MESSAGE)
        return [*send_http_response_on_exception(status, False), status]

    proxy_resend.install(proxy, failure)
