"""Outgrowing one machine, end to end: two real daemons (each with its own image and
personas) share one PostgreSQL task queue and checkpoint store and one inference server
(the OpenAI-protocol stand-in, tests/openai_standin.py). Every task runs exactly once,
also when one daemon is SIGKILLed in the middle of a task: the other requeues it (an
attempt counted) and resumes it from the shared checkpoint instead of starting over;
after a graceful stop the same happens without an attempt counted."""
from __future__ import annotations

import collections
import time

import pytest

from deployment import MODEL, Deployment, describe_call, standin_reply
from openai_standin import OpenAIStandIn

N_TASKS = 8


def _calls_by_job(server: OpenAIStandIn) -> dict[str, list[tuple[str, str]]]:
    """job -> [(daemon, what it asked)] in order."""
    out: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for key, body in list(server.calls):
        job, kind = describe_call(body)
        if job is not None:
            out[job].append((key, kind))
    return out


@pytest.mark.slow   # two daemons (~10 s of imports each) and ~30 fake-model calls
def test_two_daemons_share_one_queue_and_every_task_runs_once_through_a_sigkill(
        tmp_path, pg_dsn):
    with OpenAIStandIn(models=[MODEL], reply_fn=standin_reply, token_delay_s=0.03) as server:
        dep = Deployment(tmp_path, pg_dsn, server.url)
        observer = None
        try:
            a, b = dep.start_daemon("daemon-a"), dep.start_daemon("daemon-b")
            a.wait_ready(180)
            b.wait_ready(180)
            ids: dict[str, str] = {}
            with a.client() as ca, b.client() as cb:     # either daemon takes submissions
                for i in range(N_TASKS):
                    t = (ca if i % 2 else cb).request(
                        "task.submit", {"text": f"job-{i}: how should we share {i + 2} apples?"})
                    ids[f"job-{i}"] = t["id"]
            observer = dep.queue()

            # SIGKILL daemon a in the middle of a task, once it has finished another one
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline:
                by_job = _calls_by_job(server)
                a_done = [j for j, cs in by_job.items() if ("daemon-a", "answer") in cs]
                running = dep.running_on("daemon-a")
                for job, calls in by_job.items():
                    if a_done and ids[job] in running and calls[-1] == ("daemon-a", "BRICK"):
                        a.kill()
                        victim = job
                        break
                time.sleep(0.01)
            assert victim is not None, "daemon a never reached a second task:\n" + \
                a.output()[-3000:]

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(
                    observer.get(i).status != "done" for i in ids.values()):
                time.sleep(0.1)
            tasks = {job: observer.get(i) for job, i in ids.items()}
            assert {j: t.status for j, t in tasks.items()} == {j: "done" for j in ids}, \
                b.output()[-4000:]

            by_job = _calls_by_job(server)
            for job, calls in by_job.items():
                daemons = [d for d, _ in calls]
                personas = [k for _, k in calls]
                # one synthesis (ALFRED's choice of answer) per task: none answered twice
                assert personas.count("answer") == 1, (job, calls)
                if job == victim:
                    killed = [k for d, k in calls if d == "daemon-a"]
                    resumed = [k for d, k in calls if d == "daemon-b"]
                    assert "answer" not in killed and "BRICK" in killed, calls
                    # resumed from the shared checkpoint: not routed again, BRICK's turn
                    # (in flight at the kill) redone, then on to the answer
                    assert resumed and resumed[0] == "BRICK" and resumed[-1] == "answer"
                    assert not {"route", "decision"} & set(resumed), calls
                    assert daemons.index("daemon-b") > max(
                        i for i, d in enumerate(daemons) if d == "daemon-a")
                    assert tasks[job].attempts == 1
                else:
                    assert len(set(daemons)) == 1, (job, calls)   # one daemon ran it
                    assert tasks[job].attempts == 0
            ran = collections.Counter(calls[-1][0] for calls in by_job.values())
            assert ran["daemon-a"] >= 1 and ran["daemon-b"] >= 2, ran
            assert all(t.result and t.result.get("answer") for t in tasks.values())
            assert b.stop(60) == 0, b.output()[-3000:]
        finally:
            if observer is not None:
                observer.close()
            dep.close()


@pytest.mark.slow   # two daemons (~10 s of imports each)
def test_a_graceful_stop_hands_the_running_task_to_the_other_daemon_without_an_attempt(
        tmp_path, pg_dsn):
    """SIGTERM with a short grace: the daemon marks its unfinished task interrupted and
    leaves; the other daemon takes it over as it was (no attempt counted) and resumes
    it from the shared checkpoint."""
    # slow tokens: the rest of the task (~4 s) outlasts the grace and the SIGTERM handling
    with OpenAIStandIn(models=[MODEL], reply_fn=standin_reply, token_delay_s=0.1) as server:
        dep = Deployment(tmp_path, pg_dsn, server.url)
        observer = None
        try:
            a = dep.start_daemon("daemon-a", grace_s=0.2)
            a.wait_ready(180)
            with a.client() as ca:
                task_id = ca.request("task.submit", {"text": "job-0: share 9 apples"})["id"]
            observer = dep.queue()
            deadline = time.monotonic() + 60
            while not any(k == "BRICK" for _, k in _calls_by_job(server).get("job-0", [])):
                assert time.monotonic() < deadline, a.output()[-3000:]
                time.sleep(0.01)
            assert a.stop(60) == 0, a.output()[-3000:]
            t = observer.get(task_id)
            assert t.status == "running" and t.interrupted, (t, a.output()[-3000:])
            b = dep.start_daemon("daemon-b")
            b.wait_ready(180)
            deadline = time.monotonic() + 120
            while observer.get(task_id).status != "done":
                assert time.monotonic() < deadline, b.output()[-3000:]
                time.sleep(0.1)
            t = observer.get(task_id)
            assert (t.attempts, t.interruptions, t.interrupted) == (0, 1, False)
            calls = _calls_by_job(server)["job-0"]
            resumed = [k for d, k in calls if d == "daemon-b"]
            assert resumed and not {"route", "decision"} & set(resumed), calls
            assert [k for _, k in calls].count("answer") == 1, calls
        finally:
            if observer is not None:
                observer.close()
            dep.close()
