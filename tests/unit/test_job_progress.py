"""Job progress (backend/jobs.py): coalesced, but never at the cost of the news of a step."""

from __future__ import annotations

import time

from backend.jobs import JobContext, JobInfo


class Runner:
    def __init__(self):
        self.sent: list[dict] = []

    def _publish_threadsafe(self, session, kind, payload):
        self.sent.append(payload)


def test_a_steps_loss_logged_after_the_step_reaches_the_line():
    """Issue 15: the status bar's loss lagged a step. A training step ends (progress with the
    loss logged so far), then its own loss is logged (progress again, same step, at once): the
    second must not be coalesced away; a plain repeat still is."""
    runner = Runner()
    ctx = JobContext(runner, JobInfo(job_id="j", kind="train.start", session="s", started=time.time()))
    ctx.progress("training", 9, 24, "steps", "loss 4.3724")
    ctx.progress("training", 10, 24, "steps", "loss 4.3724")  # too soon after: coalesced
    ctx.progress("training", 10, 24, "steps", "loss 3.8260")  # step 10's own loss: shown
    ctx.progress("training", 10, 24, "steps", "loss 3.8260")  # nothing new: coalesced
    assert [(p["done"], p["message"]) for p in runner.sent] == [(9, "loss 4.3724"), (10, "loss 3.8260")]
