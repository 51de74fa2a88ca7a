"""``python -m xffl_tasks.tiny``: the tiny LLaMA model and the Italian and Czech corpora, made
offline and deterministically. Runs the maker in this process (and its CLI once as a
subprocess); starts nothing else."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from xffl_tasks.tiny import make_tiny
from xffl_tasks.tiny.__main__ import main
from xffl_tasks.tiny.corpora import make_corpus

REPO = Path(__file__).resolve().parents[3]


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


def test_layout(made):
    assert sorted(tree_hashes(made)) == [
        "data/czech/train.jsonl",
        "data/czech/validation.jsonl",
        "data/italian/train.jsonl",
        "data/italian/validation.jsonl",
        "model/config.json",
        "model/generation_config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
    ]
    assert [p.name for p in made.parent.iterdir()] == ["tiny"]


def test_the_model_is_a_small_tied_llama(made):
    from transformers import AutoModelForCausalLM

    config = json.loads((made / "model" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 2048
    model = AutoModelForCausalLM.from_pretrained(str(made / "model"), local_files_only=True)
    assert 500_000 < model.num_parameters() < 2_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_the_tokenizer_reloads_and_round_trips_both_languages(made):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(made / "model"), local_files_only=True)
    assert (
        tokenizer.unk_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    ) == (0, 1, 2, 3)
    for text in (
        "Oggi è lunedì, domani sarà martedì.",
        "Dnes je pondělí, zítra bude úterý. Příliš žluťoučký kůň",
    ):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text) / 2  # trained merges, not bytes


def test_corpora_are_structured_and_in_their_language(made):
    for language, frame, other in (
        ("italian", "domani sarà", "zítra bude"),
        ("czech", "zítra bude", "domani sarà"),
    ):
        records = [
            json.loads(line)
            for line in (made / "data" / language / "train.jsonl").read_text().splitlines()
        ]
        validation = (made / "data" / language / "validation.jsonl").read_text().splitlines()
        assert (len(records), len(validation)) == (2000, 200)
        texts = [r["text"] for r in records]
        assert all(set(r) == {"text"} for r in records)
        assert sum(frame in t for t in texts) > 200
        assert not any(other in t for t in texts)
        assert len(set(texts)) == len(texts)


def test_same_seed_same_bytes_other_seed_other_content(made, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    assert tree_hashes(again) == tree_hashes(made)
    other = make_tiny(tmp_path / "other", seed=1, train_documents=50, validation_documents=5)
    assert (
        tree_hashes(other)["data/italian/train.jsonl"]
        != tree_hashes(made)["data/italian/train.jsonl"]
    )


def test_corpora_do_not_depend_on_the_hash_seed():
    # Faker's it_IT city list comes from a set: the corpus must not follow its order.
    code = (
        "import hashlib; from xffl_tasks.tiny.corpora import make_corpus; "
        "print(hashlib.sha256(repr(make_corpus('italian', seed=0, train_documents=200, validation_documents=0)).encode()).hexdigest())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert make_corpus("czech", seed=3, train_documents=5, validation_documents=1) == make_corpus(
        "czech", seed=3, train_documents=5, validation_documents=1
    )


def test_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["--out", str(tmp_path / "busy")]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xffl_tasks.tiny", "--out", str(tmp_path / "t"), "--seed", "2", "--dtype", "bfloat16", "--untied", "--layers", "2"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "t" / "model" / "config.json").read_text())
    assert (config["tie_word_embeddings"], config["num_hidden_layers"], config["dtype"]) == (
        False,
        2,
        "bfloat16",
    )
