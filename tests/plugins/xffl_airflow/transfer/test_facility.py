"""RemoteFacility and the lexical rules that keep remote paths inside its workdir (pure)."""

from __future__ import annotations

import pytest
from xffl_airflow.transfer import RemoteFacility, TransferError
from xffl_airflow.transfer.facility import check_relative_name, is_part_name, is_within, part_path

SITE = RemoteFacility(name="site1", conn_id="facility_site1", workdir="/scratch/xffl/")


def test_the_workdir_is_normalized():
    assert SITE.workdir == "/scratch/xffl"


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("round-3/global", "/scratch/xffl/round-3/global"),
        ("./round-3//global/", "/scratch/xffl/round-3/global"),
        ("/scratch/xffl/round-3", "/scratch/xffl/round-3"),
        ("/scratch/xffl", "/scratch/xffl"),
        (".", "/scratch/xffl"),
    ],
)
def test_paths_inside_the_workdir_resolve(path, resolved):
    assert SITE.resolve(path) == resolved


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../other", "contains '..'"),
        ("round-3/../../etc", "contains '..'"),
        ("/scratch/xffl/../etc", "contains '..'"),
        ("/etc/passwd", "outside the facility's workdir /scratch/xffl"),
        ("/scratch/xffl-other/x", "outside the facility's workdir"),
        ("model\nrm -rf ~", "control characters"),
        ("back\\slash", "control characters or backslashes"),
        ("", "non-empty"),
    ],
)
def test_paths_that_escape_are_refused_naming_the_facility(path, message):
    with pytest.raises(TransferError, match=message) as caught:
        SITE.resolve(path)
    assert caught.value.facility == "site1"
    assert str(caught.value).startswith("facility site1: ")
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "site 1"}, "facility name must be"),
        ({"conn_id": ""}, "conn_id must be"),
        ({"workdir": "relative/dir"}, "workdir must be an absolute path"),
        ({"workdir": "/"}, "must not be the filesystem root"),
        ({"workdir": "/scratch/../etc"}, "must not contain '..'"),
    ],
)
def test_bad_facilities_are_refused_naming_the_field(kwargs, message):
    fields = {"name": "site1", "conn_id": "facility_site1", "workdir": "/scratch/xffl", **kwargs}
    with pytest.raises(ValueError, match=message):
        RemoteFacility(**fields)


def test_is_within_compares_whole_components():
    assert is_within("/a/b", "/a/b")
    assert is_within("/a/b", "/a/b/c")
    assert not is_within("/a/b", "/a/bc")
    assert not is_within("/a/b", "/a")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer/vocab.json", ".gitattributes"])
def test_usable_relative_names(name):
    assert check_relative_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/abs", "a/../b", "a//b", "./a", "a\tb", "x\\y", "a/.b.xffl-part"]
)
def test_unusable_relative_names_are_refused(name):
    with pytest.raises(ValueError, match="file name"):
        check_relative_name(name)


def test_part_names_sit_beside_the_final_name():
    assert part_path("/w/m/model.safetensors") == "/w/m/.model.safetensors.xffl-part"
    assert is_part_name(".model.safetensors.xffl-part")
    assert not is_part_name("model.safetensors")
