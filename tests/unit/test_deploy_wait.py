"""Waiting for applications to run (deployments/launch.py `wait_running`), against Serve status
messages as Serve 2.60 writes them: an expert placement refused in a deployment actor's
constructor is raised at once as a one-line PlacementError; replicas Serve reports unschedulable
are refused only where asked (`moe-cluster serve`'s fixed-size cluster); DEPLOY_FAILED raises."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray import serve
from ray.serve.schema import ApplicationStatus

from cluster.experts.shard_placement import PlacementError
from deployments.launch import wait_running

REFUSED = ("A deployment actor failed to start. Retrying 19 more time(s). Error:\n"
           "Deployment actor 'expert-registry' failed: The actor died because of an error raised in its creation "
           "task, ray::ExpertRegistry.__init__() (pid=1, ip=10.0.0.1)\n  File \"/x/shard_placement.py\", line 44\n"
           "    raise PlacementError(...)\ncluster.experts.shard_placement.PlacementError: cannot place 2 expert "
           "shards within 45s: asked for 2 x {CPU: 0.01} (PACK); free now: CPU 0 of 2. Free some\n")
UNSCHEDULED = ("Deployment 'EngineServer' in application 'app' has 1 replicas that have taken more than 30s to be "
               "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to "
               "be installed. Resources required for each replica: {'CPU': 1.0}, total resources available: "
               "{'CPU': 0.5}. Use `ray status` for more details.")


def _status(app_status: ApplicationStatus, message: str = "", app_message: str = "") -> SimpleNamespace:
    deployments = {"EngineServer": SimpleNamespace(message=message), "Ingress": SimpleNamespace(message="")}
    return SimpleNamespace(applications={"app": SimpleNamespace(status=app_status, message=app_message,
                                                                deployments=deployments)})


def _serve_reports(monkeypatch: pytest.MonkeyPatch, *statuses: SimpleNamespace) -> list[int]:
    polls = [0]

    def status() -> SimpleNamespace:
        polls[0] += 1
        return statuses[min(polls[0], len(statuses)) - 1]

    monkeypatch.setattr(serve, "status", status)
    return polls


def test_a_refused_expert_placement_is_raised_at_once_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    polls = _serve_reports(monkeypatch, _status(ApplicationStatus.DEPLOYING, REFUSED))
    with pytest.raises(PlacementError) as refused:
        wait_running(["app"])
    assert str(refused.value).startswith("cannot place 2 expert shards within 45s: asked for 2 x {CPU: 0.01}")
    assert "\n" not in str(refused.value) and polls[0] == 1


def test_unschedulable_replicas_are_refused_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_reports(monkeypatch, _status(ApplicationStatus.DEPLOYING, UNSCHEDULED))
    with pytest.raises(PlacementError) as refused:
        wait_running(["app"], refuse_unscheduled=True)
    assert str(refused.value).startswith("cannot place 1 replica(s) of EngineServer (application app): each asks "
                                         "for {'CPU': 1.0}; free now: {'CPU': 0.5}")
    polls = _serve_reports(monkeypatch, _status(ApplicationStatus.DEPLOYING, UNSCHEDULED),
                           _status(ApplicationStatus.RUNNING))
    wait_running(["app"])  # a cluster that may grow (an autoscaler): waited for
    assert polls[0] == 2
    slow = UNSCHEDULED.replace("{'CPU': 0.5}", "{'CPU': 3.0, 'memory': 1e9}")  # resources free: a slow start
    polls = _serve_reports(monkeypatch, _status(ApplicationStatus.DEPLOYING, slow), _status(ApplicationStatus.RUNNING))
    wait_running(["app"], refuse_unscheduled=True)
    assert polls[0] == 2


def test_a_failed_deploy_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_reports(monkeypatch, _status(ApplicationStatus.DEPLOY_FAILED, app_message="constructor raised"))
    with pytest.raises(RuntimeError, match="Deploying application app failed: constructor raised"):
        wait_running(["app"])
