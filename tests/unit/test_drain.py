"""The graceful stop's pieces without Ray (deployments/frontend/drain.py): the signal tells
replicas to drain once started and sums the requests in flight that replicas reported since then
(stale reports left out); a draining admission refuses every request with a retryable 503."""

from __future__ import annotations

import pytest

from deployments.errors import Unavailable
from deployments.frontend import drain
from deployments.frontend.admission import Admission


def test_the_signal_counts_fresh_reports_since_the_drain_began(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(drain.time, "monotonic", lambda: now[0])
    signal = drain.DrainSignal()
    assert signal.report("a", 3) is False and signal.in_flight() is None
    now[0] += 0.1
    signal.start()
    assert signal.in_flight() is None  # nobody reported since
    now[0] += 0.5
    assert signal.report("a", 2) is True and signal.report("b", 1) is True
    assert signal.in_flight() == 3
    now[0] += 0.5
    signal.report("a", 0)
    assert signal.in_flight() == 1
    now[0] += drain.FRESH_S  # b went quiet (its replica is gone): only a counts
    signal.report("a", 0)
    assert signal.in_flight() == 0


def test_a_draining_admission_refuses_with_a_retryable_503() -> None:
    admission = Admission(limit=4, retry_after_s=2)
    ticket = admission.enter()
    admission.drain()
    with pytest.raises(Unavailable) as refused:
        admission.enter()
    assert refused.value.status == 503 and refused.value.retry_after_s == 2
    assert admission.in_flight == 1  # the request admitted before runs on
    ticket.release()
    assert admission.in_flight == 0
