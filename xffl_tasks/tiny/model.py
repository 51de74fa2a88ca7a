"""A tiny LLaMA-architecture causal LM and its byte-level BPE tokenizer, made locally."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class TinyModelSpec:
    """The tiny model's shape: about 1.2 M parameters with the defaults (vocab 2048)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    dtype: str = "float32"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts),
    wrapped for ``transformers`` with LLaMA's special tokens: <unk>=0, <s>=1, </s>=2, <pad>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def make_model(tokenizer: Any, spec: TinyModelSpec, *, seed: int) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (seeded) sized for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dtype = getattr(torch, spec.dtype)
    model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Saves the model (safetensors) and the tokenizer into ``folder``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
