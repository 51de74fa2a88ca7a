"""FSDP2 (``fully_shard``) on CPUs over gloo trains as DDP does: the same per-step losses and
the same published tensors (tolerances in ``equivalence.py``), for full fine-tuning and for a
LoRA adapter, written through the sharded checkpoint (each rank its shards, rank 0
consolidating them into the folder the round pulls). No training process loads a pickle:
the LoRA runs (only this module makes them) run with every pickle load made to fail.

Starts: ``torchrun --standalone`` with two workers, four runs of 8 steps ({DDP, FSDP2} x {full,
LoRA}; the full ones are shared with test_train.py through ``torchrun_two``). The LoRA runs'
workers import a ``sitecustomize`` written by the test (``NO_PICKLE``), put first on their
``PYTHONPATH``; torchrun's own agent is left as it is.
"""

from __future__ import annotations

import os

import pytest

from tests.xffl_tasks.train.equivalence import assert_trains_as_ddp, metrics_of
from xffl_tasks.adapter import ADAPTER_WEIGHTS
from xffl_tasks.train.checkpoint import SAFE_WEIGHTS

# LoRA with two micro-batches per step: FSDP2's gradient sync is held back on the first
LORA = ("--peft", "lora", "--gradient-accumulation", "2")
CASES = {"full": ((), SAFE_WEIGHTS), "lora": (LORA, ADAPTER_WEIGHTS)}

# In a training worker (torchrun sets LOCAL_RANK for the workers, not for itself), every way
# to load a pickle raises and leaves a ``loaded-<pid>`` file with where it was called from;
# ``armed-<pid>`` says that the guard ran. pickle is replaced before torch is imported (torch.
# distributed keeps its own reference to the Unpickler, taken on import), torch.load after.
NO_PICKLE = """
import os
GUARD = os.environ.get("XFFL_NO_PICKLE_DIR")
if GUARD and "LOCAL_RANK" in os.environ:
    import _pickle, pickle, traceback

    def refuse(*args, **kwargs):
        with open(os.path.join(GUARD, f"loaded-{os.getpid()}"), "a") as file:
            file.write("".join(traceback.format_stack()))
        raise RuntimeError("a training process loaded a pickle")

    def refusing(unpickler):  # subclasses: code that subclasses them at import still can
        return type("Refusing", (unpickler,), {"__init__": refuse, "load": refuse})

    for module in (pickle, _pickle):
        module.load = module.loads = refuse
        module.Unpickler = refusing(module.Unpickler)
    pickle._load = pickle._loads = refuse
    pickle._Unpickler = refusing(pickle._Unpickler)
    import torch
    import torch._weights_only_unpickler as weights_only
    torch.load = torch.serialization.load = weights_only.load = refuse
    weights_only.Unpickler = refusing(weights_only.Unpickler)
    with open(os.path.join(GUARD, f"armed-{os.getpid()}"), "w") as file:
        file.write(os.environ["RANK"])
"""


@pytest.fixture(scope="module")
def guards(tmp_path_factory):
    """``parallelism -> folder`` of the guard's files for each LoRA run."""
    return {p: tmp_path_factory.mktemp(f"no-pickle-{p}") for p in ("ddp", "fsdp")}


@pytest.fixture(scope="module")
def pairs(torchrun_two, guards, tmp_path_factory):
    """``kind -> (ddp out, fsdp out, weights file)``."""
    site = tmp_path_factory.mktemp("sitecustomize")
    (site / "sitecustomize.py").write_text(NO_PICKLE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    runs = {}
    for kind, (flags, weights) in CASES.items():
        outs = []
        for parallelism in ("ddp", "fsdp"):
            with pytest.MonkeyPatch.context() as patch:
                if kind == "lora":  # flags no other module runs: these runs are made here
                    patch.setenv("PYTHONPATH", path)
                    patch.setenv("XFFL_NO_PICKLE_DIR", str(guards[parallelism]))
                outs.append(torchrun_two("--parallelism", parallelism, *flags))
        runs[kind] = (*outs, weights)
    return runs


@pytest.mark.parametrize("kind", CASES)
def test_fsdp2_has_ddps_loss_curve_and_checkpoint(pairs, kind, record_property):
    ddp, fsdp, weights = pairs[kind]
    assert (metrics_of(ddp)["parallelism"], metrics_of(fsdp)["parallelism"]) == ("ddp", "fsdp")
    for key, value in assert_trains_as_ddp(ddp, fsdp, weights).items():
        record_property(key, value)  # in the JUnit report (--junitxml)
    # training did move the weights: the comparison is not of two untouched copies
    curve = metrics_of(fsdp)["train_loss_curve"]
    assert curve[-1] < curve[0]


def test_the_sharded_checkpoint_leaves_nothing_behind(pairs):
    for kind in CASES:
        _, fsdp, _ = pairs[kind]
        assert not (fsdp / ".shards").exists()
        assert sorted(p.name for p in fsdp.parent.iterdir()) == ["out"]  # no staging left


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_no_training_process_loads_a_pickle(pairs, guards, parallelism):
    """Through the whole LoRA run: the build (rank 0's weights broadcast to the shards), the
    training, the staging folder's path sent to every rank, the shard files and their
    consolidation."""
    guard = guards[parallelism]
    loaded = {p.name: p.read_text() for p in guard.glob("loaded-*")}
    assert not loaded, loaded
    assert sorted(p.read_text() for p in guard.glob("armed-*")) == ["0", "1"]


def test_the_loss_curve_passes_the_aggregations_metrics_check(pairs):
    from xffl_tasks.aggregate.metrics import MAX_METRICS_BYTES, read_metrics

    _, fsdp, _ = pairs["lora"]
    assert read_metrics(fsdp, "site")["num_samples"] == 8 * 2 * 4 * 2
    assert (fsdp / "metrics.json").stat().st_size < MAX_METRICS_BYTES // 8
