"""Our safetensors header parser is at least as strict as the safetensors library (issue 22).

Crafted files, each read by our parser and by the library (``load`` on bytes, ``safe_open``
on the file, as the aggregation used to and other readers do): whatever we accept, the library
reads too. Found empirically with safetensors 0.8: lone surrogate escapes (in ``__metadata__``,
names, dtypes), shapes whose partial products overflow (even with a zero dimension), ``-0``.
And ``load_tensors`` reads what the library reads, byte for byte. Starts nothing.
"""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from xffl_tasks.aggregate.safetensors_format import (
    HeaderError,
    SafetensorsHeader,
    load_tensors,
    parse_header,
    parse_header_length,
)

T = '"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
U = '"u":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
CASES = {
    "valid": "{" + T + "}",
    "metadata_lone_surrogate": '{"__metadata__":{"a":"\\ud800"},' + T + "}",
    "metadata_surrogate_pair": '{"__metadata__":{"a":"\\ud83d\\ude00"},' + T + "}",
    "metadata_key_surrogate": '{"__metadata__":{"\\udfff":"a"},' + T + "}",
    "name_lone_surrogate": '{"t\\udc00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "dtype_lone_surrogate": '{"t":{"dtype":"F32\\ud800","shape":[2],"data_offsets":[0,8]}}',
    "metadata_null": '{"__metadata__":null,' + T + "}",
    "metadata_int": '{"__metadata__":{"a":1},' + T + "}",
    "metadata_null_value": '{"__metadata__":{"a":null},' + T + "}",
    "metadata_twice": '{"__metadata__":{},"__metadata__":{},' + T + "}",
    "duplicate_tensor": '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + T + "}",
    "duplicate_field": '{"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "extra_field": '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}',
    "zero_dim_u64_max": '{"z":{"dtype":"F32","shape":[0,18446744073709551615],'
    '"data_offsets":[0,0]},' + U + "}",
    "zero_dim_product_overflow": '{"z":{"dtype":"F32","shape":[4294967296,4294967296,0],'
    '"data_offsets":[0,0]},' + U + "}",
    "zero_dim_2_63": '{"z":{"dtype":"F32","shape":[9223372036854775808,0],'
    '"data_offsets":[0,0]},' + U + "}",
    "zero_dim_stride_overflow": '{"z":{"dtype":"F32","shape":[0,4611686018427387904,4],'
    '"data_offsets":[0,0]},' + U + "}",
    "zero_dim_fits": '{"z":{"dtype":"F32","shape":[4611686018427387904,0],'
    '"data_offsets":[0,0]},' + U + "}",
    "beyond_u64": '{"z":{"dtype":"F32","shape":[0,18446744073709551616],'
    '"data_offsets":[0,0]},' + U + "}",
    "minus_zero": '{"z":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]},' + U + "}",
    "float_shape": '{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}',
    "bool_shape": '{"t":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}',
    "nan_metadata": '{"__metadata__":{"a":NaN},' + T + "}",
    "leading_space": " {" + T + "}",
    "trailing_nul": "{" + T + "}\0",
    "trailing_form_feed": "{" + T + "}\f",
    "lowercase_dtype": '{"t":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}',
    "offsets_of_three": '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}',
    "control_character": '{"t\x01":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "bad_escape": '{"t\\x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "unclosed": '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}',
    "deep": '{"t":[[[[' + "]]]]}",
    "empty_name": '{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "nul_in_name": '{"t\\u0000":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
}
RAW_CASES = {
    "bom": b"\xef\xbb\xbf{" + T.encode() + b"}",
    "encoded_surrogate": b'{"__metadata__":{"a":"\xed\xa0\x80"},' + T.encode() + b"}",
    "overlong_utf8": b'{"__metadata__":{"a":"\xc0\xaf"},' + T.encode() + b"}",
}


def file_bytes(header: bytes, data: bytes = b"\0" * 8) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def ours(raw: bytes) -> SafetensorsHeader:
    length = parse_header_length(raw[:8], len(raw))
    tensors, metadata = parse_header(raw[8 : 8 + length], len(raw) - 8 - length)
    return SafetensorsHeader(tensors, metadata, raw[: 8 + length])


def library_reads(raw: bytes, tmp_path) -> bool:
    try:
        load(raw)
        path = tmp_path / "x.safetensors"
        path.write_bytes(raw)
        with safe_open(str(path), "pt") as file:
            file.metadata()
            for key in file.keys():
                file.get_tensor(key)
    except Exception:  # noqa: BLE001 - whatever the library raises is a refusal
        return False
    return True


ALL = {**{k: v.encode() for k, v in CASES.items()}, **RAW_CASES}


@pytest.mark.parametrize("name", sorted(ALL))
def test_what_we_accept_the_library_reads(name, tmp_path):
    raw = file_bytes(ALL[name])
    try:
        ours(raw)
    except HeaderError:
        return  # refused: nothing more to check
    assert library_reads(raw, tmp_path), f"{name}: accepted by us, refused by the library"


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("metadata_lone_surrogate", "header has a lone surrogate escape in the string '\\ud800'"),
        ("name_lone_surrogate", "lone surrogate escape in the string 't\\udc00'"),
        ("zero_dim_product_overflow", "tensor 'z': shape [4294967296, 4294967296, 0] has dim"),
        ("zero_dim_stride_overflow", "tensor 'z': shape [0, 4611686018427387904, 4] has dim"),
        ("minus_zero", "tensor 'z': shape [-0.0] is not a list of non-negative integers"),
        ("duplicate_tensor", "header key 't' appears twice in one object"),
        ("metadata_twice", "header key '__metadata__' appears twice in one object"),
        ("encoded_surrogate", "header is not UTF-8"),
        ("unclosed", "header is not valid JSON (its brackets do not balance)"),
    ],
)
def test_the_refusals_found_empirically_are_named(name, words):
    with pytest.raises(HeaderError) as raised:
        ours(file_bytes(ALL[name]))
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "name", ["valid", "metadata_surrogate_pair", "zero_dim_fits", "empty_name"]
)
def test_headers_both_read_stay_accepted(name, tmp_path):
    raw = file_bytes(ALL[name])
    ours(raw)
    assert library_reads(raw, tmp_path)


def test_load_tensors_reads_what_the_library_reads():
    tensors = {
        "f": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "h": torch.randn(2).half(),
        "e": torch.zeros(0, 3),
        "s": torch.tensor(2.5, dtype=torch.float64),
        "i": torch.arange(3, dtype=torch.int8),
        "q": torch.randn(3).to(torch.float8_e4m3fn),
        "k": torch.tensor([True, False]),
    }
    raw = save(tensors, metadata={"format": "pt"})
    mine, reference = load_tensors(raw, ours(raw)), load(raw)
    assert sorted(mine) == sorted(reference)
    for key, tensor in reference.items():
        assert mine[key].dtype == tensor.dtype and mine[key].shape == tensor.shape, key
        assert torch.equal(
            mine[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        )


def test_load_tensors_refuses_bytes_other_than_those_checked():
    raw = save({"f": torch.ones(2)})
    header = ours(raw)
    with pytest.raises(HeaderError, match="is not the file whose header was checked"):
        load_tensors(raw + b"\0", header)
    with pytest.raises(HeaderError, match="is not the file whose header was checked"):
        load_tensors(b"x" + raw[1:], header)
