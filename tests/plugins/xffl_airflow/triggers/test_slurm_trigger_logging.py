"""What the trigger writes into the task log: job lines with one time stamp (the task log's),
and an event whose repr (the triggerer's "Trigger fired event" line) is its message, not the
whole payload. Unit level: nothing is started.
"""

from __future__ import annotations

import pytest
from airflow.jobs.triggerer_job_runner import TriggerEventEntry, messages
from xffl_airflow.triggers.slurm import SlurmJobEvent, job_log_line


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("2026-12-04 15:33:49,649 xffl-train INFO step 10/30  loss 5.8584", "xffl-train INFO step 10/30  loss 5.8584"),
        ("2026-12-04T15:33:49.123Z worker ready", "worker ready"),
        ("[2026-12-04 15:33:49] srun: launching", "srun: launching"),
        ("2026-12-04T15:33:49+02:00 x", "x"),
        ("step 3 at 2026-12-04 15:33:49", "step 3 at 2026-12-04 15:33:49"),  # only a leading stamp
        ("Traceback (most recent call last):", "Traceback (most recent call last):"),
    ],
)
def test_a_job_line_loses_its_own_leading_time_stamp(line, shown):
    assert job_log_line(line) == shown


def test_the_event_repr_is_its_message_and_it_travels_as_a_plain_trigger_event():
    payload = {"status": "success", "message": "Slurm job 1 on facility_site1: ended COMPLETED",
               "log_tail": ["line"] * 50, "job_id": "1"}  # fmt: skip
    event = SlurmJobEvent(payload)
    assert repr(event) == "SlurmJobEvent<success: Slurm job 1 on facility_site1: ended COMPLETED>"
    # what the triggerer sends to its supervisor: the payload, whole
    sent = messages.TriggerStateChanges(events=[TriggerEventEntry(1, event, None)]).model_dump_json()
    received = messages.TriggerStateChanges.model_validate_json(sent)
    assert received.events[0].event.payload == payload
