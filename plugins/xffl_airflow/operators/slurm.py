"""``SlurmOperator``: runs one command as a Slurm job at a facility, deferring while it runs.

``execute()`` has one shape: re-attach to the job an earlier try submitted (or submit one),
then defer to ``SlurmJobTrigger`` with a timeout. ``execute_complete()`` returns the job report
to XCom or raises with the job's state, reason, exit code and log tail.

Exactly once: the job id goes into ``context["task_state_store"]`` as soon as sbatch answers
(``slurm_state``), and the job's ``--comment`` carries the task instance
(``xffl/<dag>/<run>/<task>/<map>``). A retry or a restarted worker re-attaches to that job
(found by id, else by its tag while it is queued or running) unless it ended in failure or was
submitted under another ``job_context``; a facility that cannot be asked is an error, never a
reason to submit again. An sbatch whose answer is lost is never followed by another sbatch: the
job is first looked up by its tag. A reported success is marked in the store with the try that
reported it: a clear runs the command again in a new job, while a retry of the same series of
tries (Airflow failed the task after it reported, as its deferral race does under load) hands
back the same job's report instead of training again.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, Context

from xffl_airflow.hooks.slurm import (
    SlurmCommandError,
    SlurmHook,
    SlurmSubmitError,
    SlurmSubmitUnknown,
)
from xffl_airflow.operators.slurm_results import (
    SlurmConfigError,
    SlurmJobError,
    SlurmSubmitRefused,
    check_event,
)
from xffl_airflow.operators.slurm_spec import JobSpec, check_untemplated, job_spec
from xffl_airflow.operators.slurm_state import (
    STATE_KEY,
    first_try_of_series,
    job_number,
    mark_reported,
    task_tag,
    try_number_of,
)
from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.login import FacilityLogin
from xffl_airflow.slurm.options import SbatchOptions
from xffl_airflow.slurm.report import job_report
from xffl_airflow.slurm.script import end_record_path, render_batch_script
from xffl_airflow.slurm.states import Phase, SlurmJob
from xffl_airflow.slurm.tags import TaskTag
from xffl_airflow.ssh import FacilityConnectionError
from xffl_airflow.triggers.slurm import SlurmJobTrigger

# defer() gets this much more than the trigger's own deadline, so the trigger's clear
# "timeout" event normally wins over Airflow's TaskDeferralTimeout.
DEFER_MARGIN = timedelta(minutes=5)


class SlurmOperator(BaseOperator):
    """Runs ``command`` in a Slurm batch job at the facility behind ``ssh_conn_id``.

    :param ssh_conn_id: the facility's Airflow SSH connection (host key pinned).
    :param command: the job's shell command (a string, placed in the script as written), or
        an argv list (each word quoted). Templated.
    :param sbatch: ``SbatchOptions`` or a plain dict of them (partition, account, qos, nodes,
        ntasks_per_node, cpus_per_task, gpus_per_node, mem, time, extra, preamble). Templated.
    :param remote_workdir: the job's working directory at the facility (created if missing;
        relative paths are under the login directory). The batch script and the log
        ``<job_name>-<job id>.log`` are written there. Templated.
    :param job_name: the Slurm job name; default ``<dag_id>.<task_id>[.<map_index>]``. Templated.
    :param poll_interval: the longest time between two polls of the job (the first polls are
        about 1 s apart, backing off towards this).
    :param timeout: how long to wait for the job (queue time included); then the job is
        cancelled (see ``cancel_on_timeout``) and the task fails.
    :param log_tail_lines: the job log's last lines shown when the job fails.
    :param env: environment variables exported in the batch script (values quoted). Templated.
    :param follow_log: stream the job's log into the task log while it runs.
    :param cancel_on_timeout: ``scancel`` the job when ``timeout`` passes.
    :param fail_fast_exit_codes: exit statuses (1-255) by which the command says that its input
        is wrong; a job ending with one fails the task at once, without its retries (each retry
        would wait in the queue again for nothing). Default none: every failure is retried.
    :param login: the facility's login environment (``FacilityLogin``: shell lines run on the
        login node before every Slurm command, such as ``module load slurm``, and the folder of
        the Slurm commands, put first on their PATH), validated when it was made. Not templated.

    Returns (XCom) the job report: ``job_id``, ``cluster``, ``conn_id``, ``state``,
    ``exit_code``, ``reason``, ``submit_time``, ``start_time``, ``end_time`` (ISO 8601),
    ``queue_wait_s``, ``run_s``, ``elapsed_s``, ``log_path``.
    """

    template_fields: Sequence[str] = ("command", "sbatch", "remote_workdir", "env", "job_name")
    template_fields_renderers: ClassVar[dict[str, str]] = {
        "command": "bash",
        "sbatch": "json",
        "env": "json",
    }
    ui_color = "#d9e7f5"

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        command: str | Sequence[str],
        remote_workdir: str,
        sbatch: SbatchOptions | dict[str, Any] | None = None,
        job_name: str | None = None,
        poll_interval: float = 30.0,
        timeout: timedelta = timedelta(days=2),
        log_tail_lines: int = 50,
        env: dict[str, str] | None = None,
        follow_log: bool = True,
        cancel_on_timeout: bool = True,
        fail_fast_exit_codes: Collection[int] = (),
        login: FacilityLogin | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ssh_conn_id = ssh_conn_id
        self.command = list(command) if isinstance(command, (list, tuple)) else command
        self.sbatch = sbatch.to_dict() if isinstance(sbatch, SbatchOptions) else sbatch
        self.remote_workdir = remote_workdir
        self.job_name = job_name
        self.env = env
        self.poll_interval = float(poll_interval)
        if not isinstance(timeout, timedelta) or timeout <= timedelta(0):
            raise SlurmConfigError(
                f"task {self.task_id}: timeout must be a positive timedelta, got {timeout!r}"
            )
        self.timeout = timeout
        if int(log_tail_lines) < 0 or self.poll_interval <= 0:
            raise SlurmConfigError(
                f"task {self.task_id}: log_tail_lines must be >= 0 and poll_interval > 0"
            )
        self.log_tail_lines = int(log_tail_lines)
        self.follow_log = follow_log
        self.cancel_on_timeout = cancel_on_timeout
        codes = list(fail_fast_exit_codes or ())
        if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255 for c in codes):
            raise SlurmConfigError(
                f"task {self.task_id}: fail_fast_exit_codes must be exit statuses from 1 to 255, "
                f"got {fail_fast_exit_codes!r}"
            )
        self.fail_fast_exit_codes = frozenset(codes)
        if login is not None and not isinstance(login, FacilityLogin):
            raise SlurmConfigError(
                f"task {self.task_id} ({ssh_conn_id}): login must be a FacilityLogin, got {type(login).__name__}"
            )
        self.login = login or FacilityLogin()
        #: What a job must have been submitted under to be taken up again by a later try (a
        #: subclass sets it, e.g. the sha256 of the round's plan); stored beside the job's id.
        self.job_context: dict[str, str] = {}
        self._job_id: str | None = None
        self._newest_known: str | None = None  # the newest job id of this task instance seen
        self._ti: Any = None  # the running task instance (try_number, max_tries)
        if not isinstance(ssh_conn_id, str) or not ssh_conn_id:
            raise SlurmConfigError(
                f"task {self.task_id}: ssh_conn_id must name an Airflow SSH connection"
            )
        self._check_untemplated()

    # -- validation ---------------------------------------------------------------------

    def _check_untemplated(self) -> None:
        """Fails at DAG parse time on whatever holds no Jinja (the rest is checked in execute)."""
        try:
            check_untemplated(sbatch=self.sbatch, command=self.command, remote_workdir=self.remote_workdir,
                              job_name=self.job_name, env=self.env)  # fmt: skip
        except SlurmInputError as error:
            raise SlurmConfigError(f"task {self.task_id} ({self.ssh_conn_id}): {error}") from None

    def _spec(self, tag: TaskTag) -> JobSpec:
        try:
            return job_spec(sbatch=self.sbatch, command=self.command, remote_workdir=self.remote_workdir,
                            job_name=self.job_name, env=self.env, tag=tag)  # fmt: skip
        except SlurmInputError as error:
            raise SlurmConfigError(f"task {self.task_id} ({self.ssh_conn_id}): {error}") from None

    # -- execute ------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        self._ti = context["ti"]
        tag = task_tag(context, self.task_id)
        spec = self._spec(tag)
        store = context.get("task_state_store")
        if store is None:
            self.log.warning(
                "No task_state_store in this Airflow: a retry finds its job by its tag only"
            )
        with self._hook() as hook:
            try:
                ref, job, tz = self._existing_job(hook, store, spec, tag) or self._submit(
                    hook, store, spec, tag
                )
                self._job_id = ref["job_id"]
                if job is not None and job.phase is Phase.SUCCESS:
                    self.log.info("Slurm job %s already ended %s", ref["job_id"], job.state)
                    report = job_report(
                        job, conn_id=self.ssh_conn_id, log_path=ref.get("log_path"), tz=tz
                    )
                    mark_reported(
                        store, ref["job_id"], report.get("cluster"), try_number_of(self._ti)
                    )
                    return report
            except FacilityConnectionError as error:
                if error.retryable:
                    raise SlurmJobError(f"task {self.task_id}: {error}") from None
                raise SlurmConfigError(f"task {self.task_id}: {error}") from None
            except SlurmSubmitError as error:
                raise SlurmSubmitRefused(f"task {self.task_id}: {error}") from None
            except SlurmCommandError as error:
                raise SlurmJobError(f"task {self.task_id}: {error}") from None
        timeout_at = datetime.now(UTC) + self.timeout
        self.defer(
            trigger=SlurmJobTrigger(
                ssh_conn_id=self.ssh_conn_id,
                job_id=ref["job_id"],
                log_path=ref.get("log_path"),
                poll_interval=self.poll_interval,
                log_tail_lines=self.log_tail_lines,
                follow_log=self.follow_log,
                timeout_at=timeout_at.isoformat(),
                cancel_on_kill=True,
                login=self.login.to_dict(),
            ),
            method_name="execute_complete",
            timeout=self.timeout + DEFER_MARGIN,
        )

    def _existing_job(self, hook: SlurmHook, store: Any, spec: JobSpec, tag: TaskTag
                      ) -> tuple[dict[str, Any], SlurmJob, str | None] | None:  # fmt: skip
        """The job an earlier try of this task instance submitted, unless it ended in failure."""
        self._newest_known = None
        stored = store.get(STATE_KEY) if store is not None else None
        if isinstance(stored, dict) and stored.get("conn_id") == self.ssh_conn_id and not self._same_context(stored):
            self._retire(hook, stored)
            return None
        if (
            isinstance(stored, dict)
            and not stored.get("job_id")
            and "unconfirmed_after" in stored
            and stored.get("conn_id") == self.ssh_conn_id
        ):
            self.log.warning(
                "An earlier try's sbatch answer was lost: looking for its job by its tag %s",
                tag.comment,
            )
            found = self._unconfirmed(hook, store, spec, tag, stored["unconfirmed_after"])
            if found is not None and found[1].phase is Phase.FAILURE:
                self.log.warning(
                    "Job %s of an earlier try ended %s: submitting anew", found[1].job_id, found[1].state
                )  # fmt: skip
                return None
            return found
        if (
            isinstance(stored, dict)
            and stored.get("job_id")
            and stored.get("conn_id") == self.ssh_conn_id
        ):
            job_id = v.check_job_id(stored["job_id"])
            self._newest_known = job_id
            if stored.get("reported"):
                first = first_try_of_series(self._ti, self.retries)
                reported_try = stored.get("reported_try")
                if first is None or not isinstance(reported_try, int) or reported_try < first:
                    self.log.info(
                        "Job %s of an earlier try succeeded and was reported: submitting anew "
                        "(the task was cleared to run again)", job_id,
                    )  # fmt: skip
                    return None
                self.log.warning(
                    "Job %s succeeded and try %s reported it, but Airflow failed that try "
                    "afterwards (no clear since): handing back its report, not training again",
                    job_id, reported_try,
                )  # fmt: skip
            # at a site without accounting the job's own end record may be all that is left
            record = end_record_path(stored.get("log_path"))
            answer = hook.query([job_id], {job_id: record} if record else None)
            job = answer.jobs.get(job_id)
            if job is None and job_id not in answer.lost:
                raise SlurmCommandError(
                    self.ssh_conn_id,
                    f"cannot tell the state of job {job_id} that an earlier try submitted "
                    f"({'; '.join(answer.problems) or 'no answer'}); not submitting another",
                )
            if job is None:
                self.log.warning(
                    "Job %s of an earlier try is unknown to Slurm now (purged): submitting anew",
                    job_id,
                )
                return None
            if job.phase is Phase.FAILURE:
                self.log.warning(
                    "Job %s of an earlier try ended %s: submitting anew", job_id, job.state
                )
                return None
            self.log.info(
                "Re-attaching to Slurm job %s (%s) submitted by an earlier try", job_id, job.state
            )
            return stored, job, answer.tz
        tz, found = hook.find_tagged(spec.job_name, tag.comment)
        self._newest_known = found[-1].job_id if found else None
        # Without a stored id only a job still queued or running is taken up: an ended one is
        # a failure, or a success that an earlier try reported (the task was cleared since).
        alive = [job for job in found if not job.phase.final]
        if not alive:
            return None
        job = alive[-1]
        ref = self._ref(job.job_id, job.cluster, job.stdout, spec)
        if store is not None:
            store.set(STATE_KEY, ref)
        self.log.info(
            "Re-attaching to Slurm job %s (%s), found by its tag %s",
            job.job_id,
            job.state,
            tag.comment,
        )
        return ref, job, tz

    def _same_context(self, stored: dict[str, Any]) -> bool:
        return all(stored.get(key) == value for key, value in self.job_context.items())

    def _retire(self, hook: SlurmHook, stored: dict[str, Any]) -> None:
        """An earlier try's job was submitted under another context (another plan): it is not
        this try's job. Cancelled if it may still run (it would write where the new job writes)."""
        shown = {key: stored.get(key) for key in self.job_context}
        if not stored.get("job_id"):
            self.log.warning("An earlier try's sbatch (answer lost) ran under %s, not %s: submitting anew", shown, self.job_context)
            return
        job_id = v.check_job_id(stored["job_id"])
        self.log.warning(
            "Job %s of an earlier try was submitted under %s, not %s: cancelling it if it still runs, "
            "submitting anew", job_id, shown, self.job_context,
        )  # fmt: skip
        try:
            hook.cancel(job_id)
        except SlurmCommandError as error:  # ended or purged already: nothing to stop
            self.log.info("Job %s was not cancelled: %s", job_id, error)

    def _submit(self, hook: SlurmHook, store: Any, spec: JobSpec, tag: TaskTag
                ) -> tuple[dict[str, Any], SlurmJob | None, str | None]:  # fmt: skip
        workdir = hook.resolve_workdir(spec.workdir)
        output = f"{workdir.rstrip('/')}/{spec.job_name}-%j.log"
        script = render_batch_script(spec.options, command=spec.command, job_name=spec.job_name,
                                     comment=tag.comment, workdir=workdir, output=output, env=spec.env)  # fmt: skip
        try:
            job_id, cluster = hook.submit(
                script, workdir=workdir, script_name=f"{spec.job_name}.sbatch"
            )
        except SlurmSubmitUnknown as error:
            # Never sbatch again blindly: the job may exist. Look for it by its tag; a retry
            # (or a restarted worker) finds this marker and looks again before submitting.
            after = self._newest_known
            if store is not None:
                store.set(STATE_KEY, {"conn_id": self.ssh_conn_id, "job_name": spec.job_name,
                                      "unconfirmed_after": after, **self.job_context})  # fmt: skip
            self.log.warning("%s: looking for the job by its tag %s", error, tag.comment)
            found = self._unconfirmed(hook, store, spec, tag, after, output=output)
            if found is None:
                raise SlurmCommandError(
                    self.ssh_conn_id,
                    f"{error.detail}, but no job tagged {tag.comment} was found; not submitting "
                    "again in this try (a retry looks for it again first)",
                ) from None
            return found
        ref = self._ref(job_id, cluster, output.replace("%j", job_id), spec)
        if store is not None:
            store.set(STATE_KEY, ref)
        self.log.info(
            "Submitted Slurm job %s to %s; log %s", job_id, self.ssh_conn_id, ref["log_path"]
        )
        return ref, None, None

    def _unconfirmed(self, hook: SlurmHook, store: Any, spec: JobSpec, tag: TaskTag,
                     after: str | None, *, output: str | None = None
                     ) -> tuple[dict[str, Any], SlurmJob, str | None] | None:  # fmt: skip
        """The job an sbatch with a lost answer submitted: the newest job with this task's tag
        newer than ``after`` (the newest one known before that sbatch), in any state."""
        tz, found = hook.find_tagged(spec.job_name, tag.comment)
        newer = [
            job for job in found if after is None or job_number(job.job_id) > job_number(after)
        ]
        if not newer:
            return None
        job = newer[-1]
        self._newest_known = job.job_id
        log_path = job.stdout or (output.replace("%j", job.job_id) if output else None)
        ref = self._ref(job.job_id, job.cluster, log_path, spec)
        if store is not None:
            store.set(STATE_KEY, ref)
        self.log.warning(
            "Found Slurm job %s (%s) by its tag %s: sbatch had submitted it", job.job_id, job.state,
            tag.comment,
        )  # fmt: skip
        return ref, job, tz

    def _ref(
        self, job_id: str, cluster: str | None, log_path: str | None, spec: JobSpec
    ) -> dict[str, Any]:
        # sbatch names the cluster only on a multi-cluster site: an unknown one is left out
        # (never ``null``), and the job's end fills it in from Slurm's report
        return {
            "job_id": job_id,
            "conn_id": self.ssh_conn_id,
            **self.job_context,
            **({"cluster": cluster} if cluster else {}),
            "log_path": log_path,
            "job_name": spec.job_name,
            "submitted_at": datetime.now(UTC).isoformat(),
        }

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if isinstance(event, dict) and event.get("status") == "timeout" and self.cancel_on_timeout:
            self._cancel(str(event.get("job_id")), why="its timeout passed")
        report = check_event(
            event, task_id=self.task_id, fail_fast_exit_codes=self.fail_fast_exit_codes
        )
        self.log.info(
            "Slurm job %s ended %s: queued %s s, ran %s s", report["job_id"], report["state"],
            report["queue_wait_s"], report["run_s"],
        )  # fmt: skip
        store = context.get("task_state_store")
        try_number = try_number_of(context.get("ti"))
        mark_reported(store, str(report["job_id"]), report.get("cluster"), try_number)
        return report

    def on_kill(self) -> None:
        """Killed while submitting or re-attaching: cancel the job (the trigger does it once deferred)."""
        if self._job_id:
            self._cancel(self._job_id, why="the task was killed")

    def _cancel(self, job_id: str, *, why: str) -> None:
        try:
            with self._hook() as hook:
                hook.cancel(job_id)
            self.log.warning("Cancelled Slurm job %s on %s: %s", job_id, self.ssh_conn_id, why)
        except Exception as error:  # noqa: BLE001 - best effort: the failure that follows tells the story
            self.log.error(
                "Could not cancel Slurm job %s on %s: %s", job_id, self.ssh_conn_id, error
            )

    def _hook(self) -> SlurmHook:
        return SlurmHook(ssh_conn_id=self.ssh_conn_id, login=self.login)
