"""A workaround, installed in Ray Serve's gRPC proxy, for streaming calls that end on the client's
side (cancel, deadline) while the proxy is sending a message.

Ray Serve 2.60's proxy cancels the replica request only when the cancellation reaches it while it
awaits the replica's next message (`ProxyResponseGenerator.__anext__`). When it arrives while the
proxy is writing a message to the client, grpc closes the proxy's response generator at its
`yield` (`gRPCProxy.send_request_to_replica`); the `GeneratorExit` is caught by its
`except BaseException`, nothing cancels the replica request, and generation runs on to the end
for nobody (KV blocks held). Dropping a Ray streaming generator does not stop its producer either.

The fix: the proxy's response wrapper cancels its replica request when it is garbage-collected
before it finished, which happens as soon as the abandoned generator is closed. It is installed
by listing `add_stream_cancellation_to_server` among Serve's `grpc_servicer_functions`, the one
hook that runs inside the proxy process; it adds no service. If Serve's internals differ from the
version this was written against, it logs a warning and changes nothing.

The same hook also forwards the client's deadline: Serve copies only the call's metadata to the
replica, so the proxy adds `x-moe-cluster-deadline` (the deadline as Unix seconds) to the context
it sends, and `forwarded_deadline` reads it back in the ingress, which then counts a call that
ended at its deadline as such (`ray_moe_cluster_requests_finished_total{reason="deadline"}`)
rather than as a client cancel.

And it answers a call whose ingress replica died with a retryable 503 / UNAVAILABLE
(`proxy_replica_lost.py`), or sends it to another replica when nothing was sent back yet
(`proxy_resend.py`), for HTTP too: the hook runs in the process of both proxies.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from deployments.grpc import proxy_replica_lost

logger = logging.getLogger("ray.serve")
_installed = False
DEADLINE_METADATA = "x-moe-cluster-deadline"  # written here by the proxy, read by `forwarded_deadline`


def forwarded_deadline(grpc_context: Any) -> float | None:
    """The client's deadline (Unix seconds) that the proxy forwarded with a call, if any."""
    try:
        for key, value in grpc_context.invocation_metadata() or ():
            if key == DEADLINE_METADATA:
                return float(value)
    except Exception:  # noqa: BLE001 - a context without metadata, or a bad value: no deadline
        logger.debug("reading a forwarded gRPC deadline failed", exc_info=True)
    return None


def add_stream_cancellation_to_server(servicer: Any, server: Any) -> None:
    """Signature of a servicer function, so that Serve's gRPC proxy calls it at start."""
    global _installed
    if _installed:
        return
    try:
        from ray.serve._private import proxy
        from ray.serve._private.proxy_response_generator import ProxyResponseGenerator
    except ImportError as exc:
        logger.warning("gRPC stream cancellation fix not installed: %s", exc)
        return
    if getattr(proxy, "ProxyResponseGenerator", None) is not ProxyResponseGenerator:
        logger.warning("gRPC stream cancellation fix not installed: unexpected Serve proxy internals")
        return

    class CancelOnDropResponseGenerator(ProxyResponseGenerator):
        def __del__(self) -> None:
            response = getattr(self, "_response", None)
            if response is None or getattr(self, "_done", True):
                return
            try:
                if not response.cancelled():
                    response.cancel()
            except Exception:  # noqa: BLE001 - a finalizer must not raise
                logger.debug("cancelling an abandoned gRPC stream failed", exc_info=True)

    proxy.ProxyResponseGenerator = CancelOnDropResponseGenerator  # type: ignore[misc]  # the patch itself
    _forward_deadlines()
    proxy_replica_lost.install(proxy)  # a dead ingress replica: 503 / UNAVAILABLE, not 500 / INTERNAL
    _installed = True


def _forward_deadlines() -> None:
    try:
        from ray.serve._private import proxy_request_response as prr
    except ImportError as exc:
        logger.warning("gRPC deadline forwarding not installed: %s", exc)
        return
    make_context = getattr(prr, "RayServegRPCContext", None)
    if make_context is None:
        logger.warning("gRPC deadline forwarding not installed: unexpected Serve proxy internals")
        return

    def context_with_deadline(grpc_context: Any) -> Any:
        context = make_context(grpc_context)
        try:
            remaining = grpc_context.time_remaining()
            if remaining is not None and hasattr(context, "_invocation_metadata"):
                deadline = f"{time.time() + remaining:.3f}"
                context._invocation_metadata.append((DEADLINE_METADATA, deadline))
                context._invocation_metadata_dict[DEADLINE_METADATA] = deadline
        except Exception:  # noqa: BLE001 - never fail a call over its deadline's metadata
            logger.debug("forwarding a gRPC deadline failed", exc_info=True)
        return context

    prr.RayServegRPCContext = context_with_deadline  # type: ignore[misc, assignment]  # the patch: a factory
