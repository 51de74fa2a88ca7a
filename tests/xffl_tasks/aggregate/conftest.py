"""Real Hugging Face checkpoints for the aggregation tests, made once per session.

A tiny llama (tied embeddings) saved by transformers' ``save_pretrained`` in bf16, sharded in
several files, with a tokenizer; three clients are the same model perturbed deterministically,
each saved with its own shard size (one of them as a single file), as trainers do. Starts no
process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

BASE_SHARD = "40KB"
CLIENT_SHARDS = {"site1": "40KB", "site2": "10GB", "site3": "70KB"}
CLIENT_SAMPLES = {"site1": 100, "site2": 300, "site3": 600}


def tiny_llama(dtype: torch.dtype = torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(255)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)


def perturb(model, seed: int, scale: float) -> None:
    """Adds deterministic noise (``scale`` times a standard normal) to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * scale
            parameter.copy_((parameter.float() + noise).to(parameter.dtype))


def write_metrics(folder: Path, num_samples: int) -> None:
    (folder / "metrics.json").write_text(
        json.dumps({"num_samples": num_samples, "num_tokens": 50 * num_samples})
    )


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's safetensors files (the reference library reads them)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@dataclass(frozen=True)
class Family:
    """A base model folder and its clients' folders (name -> folder)."""

    base: Path
    clients: dict[str, Path]

    def copy_to(self, root: Path) -> Family:
        """A copy under ``root``, for tests that alter files."""
        base = Path(shutil.copytree(self.base, root / "base"))
        clients = {
            name: Path(shutil.copytree(path, root / name)) for name, path in self.clients.items()
        }
        return Family(base, clients)


def make_family(root: Path, dtype: torch.dtype) -> Family:
    model = tiny_llama(dtype)
    base = root / "base"
    model.save_pretrained(base, max_shard_size=BASE_SHARD)
    save_tokenizer(base)
    clients = {}
    for seed, (name, shard) in enumerate(CLIENT_SHARDS.items(), 1):
        client = tiny_llama(dtype)
        perturb(client, seed, 0.01 * seed)
        client.save_pretrained(root / name, max_shard_size=shard)
        save_tokenizer(root / name)
        write_metrics(root / name, CLIENT_SAMPLES[name])
        clients[name] = root / name
    return Family(base, clients)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Family:
    """bf16 base model (6 shards) and clients site1 (same shards), site2 (one file), site3."""
    return make_family(tmp_path_factory.mktemp("family-bf16"), torch.bfloat16)


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory) -> Family:
    return make_family(tmp_path_factory.mktemp("family-f32"), torch.float32)


@pytest.fixture
def family_copy(family, tmp_path) -> Family:
    return family.copy_to(tmp_path / "inputs")
