"""The pull's check of what a facility sent: the same checks, by the same code, as the aggregation.

    metrics = check_client_folder(input_model, client_folder, name="site1", adapter=False)

Once a client's folder is downloaded, ``check_client_folder`` refuses whatever the aggregation
would refuse of it, reading every file the aggregation reads with the same bounded readers:
``metrics.json`` (``metrics``; required), every safetensors header and
``model.safetensors.index.json`` (``model_folder``), or ``adapter_config.json`` and
``adapter_model.safetensors`` (``lora``), and the tensors' names, shapes and dtypes against the
round's input model (or adapter). For adapters it also reads the tensors (small) and refuses NaN
or Inf; a full model's values are left to the aggregation, which leaves such a client out.
Any failure is an ``AggregationError`` naming the client and the file: the pull sets the
facility aside instead of retrying. The aggregation (``aggregate``) calls the same functions.

When the round's input model itself fails its checks, that is no facility's fault:
``InputModelError`` (not an AggregationError), so that the pull fails and retries as for any
other error of ours.
"""

from __future__ import annotations

from pathlib import Path

from xffl_tasks.aggregate.errors import AggregationError
from xffl_tasks.aggregate.facility_files import refusing
from xffl_tasks.aggregate.metrics import METRICS_FILE, read_metrics
from xffl_tasks.aggregate.model_folder import ModelFolder, check_same_tensors, open_model_folder
from xffl_tasks.aggregate.update_bounds import check_num_samples
from xffl_tasks.aggregate.weights import ClientWeight, metrics_weight

INPUT_MODEL_LABEL = "the round's input model"
INPUT_ADAPTER_LABEL = "the round's input adapter"


class InputModelError(RuntimeError):
    """The round's input model (or adapter, or base) fails its own checks: ours to fix."""


def client_label(name: str) -> str:
    return f"client {name!r}"


def client_metrics(folder: Path, name: str, *, max_samples: int | None = None) -> dict:
    """The client's validated metrics.json, its num_samples within ``max_samples``."""
    with refusing(client_label(name), METRICS_FILE):
        metrics = read_metrics(Path(folder), name)
    check_num_samples(name, metrics["num_samples"], max_samples)
    return metrics


def client_weight(
    folder: Path, name: str, given: ClientWeight | None, max_samples: int | None
) -> ClientWeight:
    """The client's weight: ``given``, else its metrics' num_samples; a bound on num_samples
    reads the metrics even when the weight is given (a bound on the claim reads the claim)."""
    if given is None:
        return metrics_weight(client_metrics(folder, name, max_samples=max_samples))
    if max_samples is not None:
        client_metrics(folder, name, max_samples=max_samples)
    return given


def open_client_model(previous: ModelFolder, folder: Path, name: str) -> ModelFolder:
    """The client's model folder, its headers and index parsed and validated, holding exactly
    the previous model's tensors (names, shapes, dtypes)."""
    label = client_label(name)
    with refusing(label):
        model = open_model_folder(Path(folder), label=label)
        check_same_tensors(previous, model)
    return model


def _input(open_it, label: str):
    try:
        return open_it()
    except AggregationError as error:
        raise InputModelError(f"{label} fails its own checks: {error}") from None


def check_client_folder(
    previous: Path,
    client: Path,
    *,
    name: str,
    adapter: bool,
    strategy: str | None = None,
    max_samples: int | None = None,
    read_values: bool | None = None,
) -> dict:
    """Refuses whatever the aggregation would refuse of the client's folder; returns its
    validated metrics (the dict ``metrics.parse_metrics`` returns).

    :param previous: the round's input model folder (``adapter``: its input adapter folder;
        ``strategy="lora-stacked"``: the round's base model folder).
    :param client: the folder pulled from the facility.
    :param name: the facility's name (``client 'name'`` in messages, as in the aggregation).
    :param adapter: whether the round trains LoRA adapters (PEFT folders) or full models.
    :param strategy: the aggregation strategy: ``lora-stacked`` changes the checks (ranks may
        differ from the input's; tensors must fit the base); ``lora-frozen-a`` also refuses an
        adapter whose A moved (when the values are read).
    :param max_samples: the facility's declared bound on num_samples (None: none).
    :param read_values: read the tensors and refuse NaN or Inf; default: for adapters only.
    :raises AggregationError: naming the client and the file, on anything the aggregation
        would refuse (MetricsError, a subclass, for metrics.json).
    :raises InputModelError: when ``previous`` itself fails its checks.
    """
    metrics = client_metrics(client, name, max_samples=max_samples)
    label = client_label(name)
    values = adapter if read_values is None else read_values
    if adapter:
        from xffl_tasks.aggregate import lora

        if strategy == "lora-stacked":
            from xffl_tasks.aggregate.lora_stacked import check_stacked_client

            check_stacked_client(Path(previous), Path(client), label=label)
            their_settings, their_header = lora._open_adapter(Path(client), label)
        else:
            settings, header = _input(
                lambda: lora._open_adapter(Path(previous), INPUT_ADAPTER_LABEL),
                INPUT_ADAPTER_LABEL,
            )
            prior = lora.Adapter(INPUT_ADAPTER_LABEL, Path(previous), settings, header, {}, {}, 0)
            their_settings, their_header = lora._open_adapter(Path(client), label)
            lora._same_tensors(prior, label, their_settings, their_header)
        if values:
            theirs = lora._load(Path(client), label, their_settings, their_header)
            if strategy == "lora-frozen-a":
                lora.check_frozen_a(
                    lora._load(Path(previous), INPUT_ADAPTER_LABEL, settings, header), theirs, label
                )
        return metrics
    previous_model = _input(
        lambda: open_model_folder(Path(previous), label=INPUT_MODEL_LABEL), INPUT_MODEL_LABEL
    )
    model = open_client_model(previous_model, Path(client), name)
    if values:
        from xffl_tasks.aggregate.update_norms import update_norms

        (result,) = update_norms(previous_model, [model])
        if result.problem is not None:
            raise AggregationError(f"{label}: {result.problem}")
    return metrics
