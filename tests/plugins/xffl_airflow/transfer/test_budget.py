"""The pull's budget: which files a facility may send back, each one's size, their count and
total, decided by the caller and checked on the remote listing before anything is written.

Pure logic on literal listings, and ``PullRun`` on a fake session that can only list (nothing
is started; a refused pull must not go on to hash, open or write anything).
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from xffl_airflow.transfer import (
    FileAllowance,
    PullBudget,
    PullRefused,
    RemoteFacility,
    TransferError,
    TransferOptions,
    check_listing,
)
from xffl_airflow.transfer.budget import METRICS_LIMIT, SMALL_FILE_LIMIT, WEIGHTS_MARGIN
from xffl_airflow.transfer.pull import PullRun

GB = 10**9
SITE = RemoteFacility(name="site1", conn_id="facility_site1", workdir="/scratch/xffl")
SHARDS = {"model-00001-of-00002.safetensors": 4_900_000_000,
          "model-00002-of-00002.safetensors": 1_200_000_000}  # fmt: skip
WEIGHTS = sum(SHARDS.values())


def pushed_model(folder: Path, files: dict[str, int], *, via_links: bool = True) -> Path:
    """A pushed folder as the round makes it (``input/``: links to the model's files), the
    files sparse so that their sizes cost no disk."""
    real = folder.parent / f"{folder.name}-files"
    real.mkdir(parents=True)
    folder.mkdir(parents=True)
    for name, size in files.items():
        with open(real / name, "wb") as f:
            f.truncate(size)
        if via_links:
            (folder / name).symlink_to(real / name)
        else:
            (real / name).rename(folder / name)
    return folder


@pytest.fixture
def full(tmp_path) -> PullBudget:
    files = {**SHARDS, "model.safetensors.index.json": 30_000, "config.json": 700,
             "tokenizer.json": 9_000_000, "tokenizer_config.json": 50_000}  # fmt: skip
    return PullBudget.for_model(pushed_model(tmp_path / "input", files), adapter=False)


TRAINED = [("config.json", 700), ("generation_config.json", 200), ("metrics.json", 3_000),
           *SHARDS.items(), ("model.safetensors.index.json", 30_000),
           ("tokenizer.json", 9_000_100), ("tokenizer_config.json", 50_000)]  # fmt: skip


def refusal(budget: PullBudget, listing) -> PullRefused:
    with pytest.raises(PullRefused) as refused:
        check_listing(budget, listing, facility="site1")
    assert isinstance(refused.value, TransferError) and not refused.value.retryable
    assert str(refused.value).startswith("facility site1: pull refused before writing anything: ")
    return refused.value


def test_a_trained_model_fits_the_budget_of_what_was_pushed(full):
    check_listing(full, TRAINED, facility="site1")
    # sharded otherwise (max_shard_size): the same weights in three files still fit
    resharded = [(n, s) for n, s in TRAINED if not n.startswith("model-")] + [
        ("model-00001-of-00003.safetensors", 2_000_000_000),
        ("model-00002-of-00003.safetensors", 2_000_000_000),
        ("model-00003-of-00003.safetensors", WEIGHTS - 4_000_000_000 + 100_000),
    ]
    check_listing(full, resharded, facility="site1")
    assert full.max_files == 6 + 16
    assert full.max_total_bytes == (
        WEIGHTS + WEIGHTS_MARGIN + METRICS_LIMIT
        + sum(2 * s + SMALL_FILE_LIMIT for s in (30_000, 700, 9_000_000, 50_000))
    )  # fmt: skip


def test_twenty_thousand_files_announcing_81_gb_are_refused_by_count(full):
    listing = [(f"shard-{i:05d}.bin", 4_050_000) for i in range(20_002)]
    refused = refusal(full, listing)
    assert str(refused) == (
        "facility site1: pull refused before writing anything: the remote folder holds 20002 "
        "files, more than the 22 the pull allows (max_files)"
    )
    assert refused.file is None and refused.limit == 22


def test_a_file_the_pull_does_not_expect_is_refused_naming_it(full):
    refused = refusal(full, [*TRAINED, ("payload.bin", 10)])
    assert (
        "file 'payload.bin' (10 bytes) is not one the pull expects (allowed: model weights, "
        in str(refused)
    )
    assert refused.file == "payload.bin" and refused.limit == 0
    for name in ("sub/config.json", "pytorch_model.bin", "model-1-of-2.safetensors", ".hidden"):
        assert refusal(full, [(name, 1)]).file == name


def test_a_shard_larger_than_all_pushed_weights_is_refused(full):
    refused = refusal(full, [("model-00001-of-00002.safetensors", 81 * GB)])
    assert str(refused).endswith(
        f"file 'model-00001-of-00002.safetensors' announces {81 * GB} bytes, more than the "
        f"{WEIGHTS + WEIGHTS_MARGIN} allowed for it (model weights)"
    )
    assert refused.limit == WEIGHTS + WEIGHTS_MARGIN


def test_weights_that_grow_together_are_refused_at_the_shard_that_crosses(full):
    listing = [("model-00001-of-00003.safetensors", WEIGHTS),
               ("model-00002-of-00003.safetensors", WEIGHTS_MARGIN),
               ("model-00003-of-00003.safetensors", 1)]  # fmt: skip
    refused = refusal(full, listing)
    assert refused.file == "model-00003-of-00003.safetensors"
    assert "brings model weights to" in str(refused) and "allowed for them together" in str(refused)


def test_metrics_and_small_files_have_their_own_limits(full):
    refused = refusal(full, [("metrics.json", METRICS_LIMIT + 1)])
    assert refused.file == "metrics.json" and refused.limit == METRICS_LIMIT
    refused = refusal(full, [("config.json", 2 * 700 + SMALL_FILE_LIMIT + 1)])
    assert refused.limit == 2 * 700 + SMALL_FILE_LIMIT
    # a name that was not pushed: bounded by the largest pushed config or tokenizer file
    check_listing(full, [("chat_template.jinja", 2 * 9_000_000 + SMALL_FILE_LIMIT)], facility="s")
    refused = refusal(full, [("merges.txt", 2 * 9_000_000 + SMALL_FILE_LIMIT + 1)])
    assert refused.file == "merges.txt"
    refused = refusal(full, [("metrics.json", 10), ("metrics.json", 10)])
    assert "one more than the 1 file(s) allowed of metrics.json" in str(refused)


def test_the_callers_total_and_count_replace_the_defaults(tmp_path):
    folder = pushed_model(tmp_path / "input", {"model.safetensors": 1000, "config.json": 10})
    tight = PullBudget.for_model(folder, adapter=False, max_total_bytes=1500, max_files=2)
    refused = refusal(tight, [("model.safetensors", 1000), ("config.json", 600)])
    assert str(refused).endswith(
        "file 'config.json' brings the pull to 1600 bytes, more than its budget of 1500 "
        "(max_total_bytes)"
    )
    assert (
        refusal(tight, [("model.safetensors", 1), ("config.json", 1), ("metrics.json", 1)]).limit
        == 2
    )
    raised = PullBudget.for_model(folder, adapter=False, max_total_bytes=100 * GB, max_files=100)
    assert (raised.max_total_bytes, raised.max_files) == (100 * GB, 100)


def test_an_adapter_budget_allows_only_the_adapter_its_config_and_metrics(tmp_path):
    folder = pushed_model(tmp_path / "input", {"adapter_model.safetensors": 2_000_000,
                                               "adapter_config.json": 600}, via_links=False)  # fmt: skip
    budget = PullBudget.for_model(folder, adapter=True)
    check_listing(budget, [("adapter_config.json", 640), ("adapter_model.safetensors", 2_000_000),
                           ("metrics.json", 2_000)], facility="site1")  # fmt: skip
    assert refusal(budget, [("model.safetensors", 10)]).file == "model.safetensors"
    assert refusal(budget, [("tokenizer.json", 10)]).file == "tokenizer.json"
    assert refusal(
        budget, [("adapter_model.safetensors", 2_000_000 + WEIGHTS_MARGIN + 1)]
    ).limit == (2_000_000 + WEIGHTS_MARGIN)


def test_a_pushed_folder_without_weights_or_missing_is_an_error(tmp_path):
    folder = pushed_model(tmp_path / "input", {"config.json": 10})
    with pytest.raises(ValueError, match=r"pushed model folder .* holds no model weights"):
        PullBudget.for_model(folder, adapter=False)
    with pytest.raises(ValueError, match="holds no adapter weights"):
        PullBudget.for_model(folder, adapter=True)
    with pytest.raises(ValueError, match="does not exist"):
        PullBudget.for_model(tmp_path / "absent", adapter=False)


def test_budgets_are_typed_and_round_trip_as_json():
    budget = PullBudget(
        3, 100, (FileAllowance.exact("a.json", 10), FileAllowance(r"w-\d\.bin", 50, None, 60, "w"))
    )
    assert PullBudget.from_dict(budget.to_dict()) == budget
    assert FileAllowance.exact("a.b", 1).matches("a.b") and not FileAllowance.exact(
        "a.b", 1
    ).matches("axb")
    for bad in (lambda: PullBudget(0, 1), lambda: PullBudget(1, -1), lambda: PullBudget(True, 1),
                lambda: FileAllowance("x", -1), lambda: FileAllowance("(", 1)):  # fmt: skip
        with pytest.raises(Exception):  # noqa: B017 - ValueError or re.error
            bad()


# -- the pull itself stops at its listing ---------------------------------------------------------


def entry(name: str, mode: int, size: int = 0) -> SimpleNamespace:
    return SimpleNamespace(filename=name, attrs=SimpleNamespace(permissions=mode, size=size))


class ListingOnly:
    """A facility session that can list folders and nothing else; counts the entries it gave."""

    def __init__(self, folders: dict[str, list[SimpleNamespace]]):
        self.sftp = SimpleNamespace(scandir=self.scandir)
        self.folders = folders
        self.listed = 0

    async def scandir(self, folder: str):
        for item in self.folders[folder]:
            self.listed += 1
            yield item

    async def confine(self, path: str) -> str:
        return path

    @contextlib.contextmanager
    def translate(self, action: str, path: str):
        yield

    def __getattr__(self, name: str):
        raise AssertionError(f"the pull went on to {name}() after a refused listing")


def pull_run(local: Path, budget: PullBudget) -> PullRun:
    return PullRun(budget=budget, facility=SITE, target=None, options=TransferOptions(),
                   local_dir=local, remote_dir="/scratch/xffl/r")  # fmt: skip


def test_a_huge_listing_is_refused_while_listing_and_nothing_is_written(tmp_path, full):
    entries = [entry(".", stat.S_IFDIR | 0o755), entry("..", stat.S_IFDIR | 0o755)]
    entries += [entry(f"f{i:05d}", stat.S_IFREG | 0o644, 4_050_000) for i in range(20_002)]
    session = ListingOnly({"/scratch/xffl/r": entries})
    local = tmp_path / "clients" / "site1"
    with pytest.raises(PullRefused) as refused:
        asyncio.run(pull_run(local, full).attempt(session))
    assert str(refused.value) == (
        "facility site1: pull refused before writing anything: the remote folder "
        "/scratch/xffl/r holds more than the 22 files the pull allows (max_files; listing stopped)"
    )
    assert session.listed == 2 + 23  # stopped at the first entry past the budget
    assert not local.exists()


def test_an_oversized_file_in_the_listing_is_refused_before_any_folder_is_made(tmp_path, full):
    session = ListingOnly({
        "/scratch/xffl/r": [entry("metrics.json", stat.S_IFREG | 0o644, 100),
                            entry("model-00001-of-00002.safetensors", stat.S_IFREG | 0o644, 81 * GB)],
    })  # fmt: skip
    local = tmp_path / "clients" / "site1"
    with pytest.raises(PullRefused) as refused:
        asyncio.run(pull_run(local, full).attempt(session))
    assert refused.value.file == "model-00001-of-00002.safetensors"
    assert refused.value.path == "model-00001-of-00002.safetensors"
    assert not local.exists()
