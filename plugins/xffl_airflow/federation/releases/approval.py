"""A person's approval of a release, in the Airflow UI (``ApprovalOperator``, Airflow's
human-in-the-loop): asked only when the sealed release plan says so.

The form's subject and body come from the decision in storage (never from XCom): the model,
the best round and why, per facility the losses of the last global model and of the last
release, the rounds, the bytes moved and, when the manifests hold it, the privacy spent.
"Reject", or no answer within ``approval_timeout_h`` (the default option is "Reject"), releases
nothing. The answer (who, when) is recorded in storage (``<campaign>/release/approval.json``)
for the release record; ``publish`` obeys the task's state, not XCom.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from xffl_airflow.federation.errors import RoundError
from xffl_airflow.federation.names import FederationDag

APPROVAL_FILE = "approval.json"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def approval_text(plan: Any, decision: dict[str, Any], manifests: list[dict[str, Any]]) -> tuple[str, str]:
    """The form's subject and Markdown body, from the sealed plan, the decision and the chain."""
    selection, comparison = decision["selection"], decision["comparison"]
    final = (selection.get("final_evaluation") or {}).get("losses") or {}
    released = (decision.get("release_evaluation") or {}).get("losses") or {}
    moved: dict[str, int] = {}
    for manifest in manifests:
        for name, facility in (manifest.get("facilities") or {}).items():
            for key in ("push", "push_base", "pull"):
                sent = (facility or {}).get(key) or {}
                moved[name] = moved.get(name, 0) + int(sent.get("bytes_sent") or 0)
    previous = plan.previous_release
    subject = f"Release campaign {plan.campaign}, round {selection['round']}'s model?"
    rows = [
        f"| {name} | {_number(final.get(name))} | {_number(released.get(name))} | {moved.get(name, 0) / 1e6:.1f} |"
        for name in plan.facility_names
    ]  # fmt: skip
    privacy = [m.get("privacy") for m in manifests if isinstance(m.get("privacy"), dict)]
    spent = ""
    if privacy:
        epsilons = (privacy[-1].get("facilities") or {}) if isinstance(privacy[-1].get("facilities"), dict) else {}
        spent = "\n**Privacy spent (ε, cumulative):** " + ", ".join(
            f"{n}: {_number((e or {}).get('epsilon'))}" for n, e in sorted(epsilons.items())) + "\n"  # fmt: skip
    body = "\n".join([
        f"Campaign **{plan.campaign}** ended after round {plan.final_round} ({len(manifests)} rounds, strategy "
        f"`{plan.strategy}`). The best global model is round **{selection['round']}**'s: {selection['reason']}",
        "",
        f"Against {'release ' + str(previous.number) if previous else 'no previous release'}: {comparison['reason']}.",
        "",
        "| facility | loss of the last global model | loss of the last release | MB moved |",
        "|---|---|---|---|",
        *rows,
        spent,
        "Approve to publish it as the federation's next release; Reject (or no answer) releases nothing.",
    ])  # fmt: skip
    return subject, body


class ReleaseApprovalOperator(ApprovalOperator):
    """Asks a person to approve the release the decision says to make (when the plan asks)."""

    def __init__(self, *, federation: FederationDag, **kwargs: Any) -> None:
        super().__init__(subject="Release the campaign's model?", defaults="Reject", **kwargs)
        self.federation = federation

    def _sealed(self, context: Context):
        from xffl_airflow.federation.releases.evaluate import release_of
        from xffl_airflow.federation.releases.select import decision

        try:
            sealed = release_of(self.federation, context)
            return sealed, decision(sealed)
        except RoundError as error:
            raise AirflowFailException(f"{type(error).__name__}: {error}") from None

    def execute(self, context: Context):
        from xffl_tasks.release.chain import read_campaign

        sealed, decided = self._sealed(context)
        if not sealed.plan.approval:
            self.log.info("the release plan asks for no approval: %s", decided["reason"])
            return {"chosen_options": [self.APPROVE], "responded_by_user": None, "not_asked": True}
        chain = read_campaign(sealed.layout.folder.parent, through_round=sealed.plan.final_round)
        self.subject, self.body = approval_text(sealed.plan, decided, chain.manifests)
        self.response_timeout = timedelta(hours=sealed.plan.approval_timeout_h)
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Records the answer in storage first: on "Reject" the parent skips ``publish`` by
        raising, and on a timeout it fails; either way the record says nothing was approved."""
        from xffl_airflow.federation.sealing import now
        from xffl_tasks.manifest import write_json_atomic

        sealed, _ = self._sealed(context)
        chosen = [str(option) for option in (event.get("chosen_options") or [])]
        user = event.get("responded_by_user")
        write_json_atomic(sealed.layout.folder / APPROVAL_FILE, {
            "plan_sha256": sealed.sha256, "approved": chosen == [self.APPROVE] and "error" not in event,
            "chosen_options": chosen, "error": str(event["error_type"]) if "error" in event else None,
            "responded_by": user if isinstance(user, (dict, str)) or user is None else str(user),
            "responded_at": str(event.get("responded_at")), "recorded_at": now(),
        })  # fmt: skip
        return super().execute_complete(context, event)  # skips publish on "Reject"
