"""Shared fixtures: tiny models built from configs (no downloads) and the real packaged MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from s3_server import s3_env, seaweedfs  # noqa: F401  (a real S3 server: one per session, started on first use)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GLUE_DIR = Path(os.environ.get("BITFIT_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
REPO = Path(__file__).resolve().parents[1]

# Per-dtype tolerances for equivalence checks (outputs of two computation orders of the same maths).
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def tiny_config(kind: str):
    from transformers import BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, RobertaConfig, T5Config

    common = dict(vocab_size=99)
    if kind == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **common)
    if kind == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **common)
    if kind == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **common)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if kind == "t5":
        return T5Config(d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2, **common)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64, **common)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    """A randomly initialised base model of `kind` (deterministic for a seed), in eval mode."""
    from transformers import AutoModel, T5EncoderModel

    torch.manual_seed(seed)
    config = tiny_config(kind)
    model = T5EncoderModel(config) if kind == "t5" else AutoModel.from_config(config)
    return model.eval()


def tiny_inputs(batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from bitfit.backbone import default_backbone_dir

    return default_backbone_dir()


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR} (set BITFIT_GLUE_DIR)")
    return GLUE_DIR


@pytest.fixture(scope="session")
def minilm_backbone(minilm_dir):
    """The real packaged MiniLM, loaded once; tests that move biases use `fresh_minilm`."""
    from bitfit.backbone import load_backbone

    return load_backbone(minilm_dir)


@pytest.fixture
def fresh_minilm(minilm_backbone):
    import copy

    return copy.deepcopy(minilm_backbone)


def write_rows(path: Path, header: list[str], rows: list[list[str]], sep: str = "\t") -> Path:
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytest.mark.usefixtures("one_torch_thread")`): small ops on a busy 2-core
    machine wait for a second thread that is not scheduled (a 12-token decode took minutes with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
