"""Causal language modelling on a BitFit backbone: the LM head, the prompt template and the loss.

The backbone stays the base model `load_backbone` gives (e.g. `LlamaModel` with injected biases), so a
generation bias set has the very fingerprint and layout a classification set on that backbone has, and
the server's backbone serves both. The LM head is not part of it: where the checkpoint ties it to the
input embeddings (SmolLM2 does), logits are `hidden @ embed_tokens.weight.T`; otherwise the head's
`lm_head.weight` is read from the model directory, frozen. So the head adds nothing to train or store.

A prompt is the template with `{input}` replaced by the task input (a plain replace, so braces in the
input are safe); the target is the reference followed by the eos token. Only target tokens carry loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitfit.errors import BitfitError, DataError

PLACEHOLDER = "{input}"
# ChatML, for tokenizers that know its markers (SmolLM2-Instruct): the base model answers such a prompt as it
# was instruction-tuned to, which makes its zero-shot output a fair floor. Otherwise a plain prompt.
CHATML_TEMPLATE = ("<|im_start|>user\nWrite one sentence that describes this restaurant: {input}<|im_end|>\n"
                   "<|im_start|>assistant\n")
PLAIN_TEMPLATE = "Restaurant: {input}\nOne-sentence description:"
DEFAULT_STOP = ("\n",)  # a sentence ends at the line's end; eos always stops too
IGNORE = -100  # label of positions without loss (prompt and padding)
MAX_STOPS = 4  # as OpenAI's `stop`
MAX_STOP_CHARS = 64


def default_template(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return CHATML_TEMPLATE if "<|im_start|>" in vocab and "<|im_end|>" in vocab else PLAIN_TEMPLATE


def template_problems(template: object) -> list[str]:
    if not isinstance(template, str):
        return [f"prompt template must be a string, got {type(template).__name__}"]
    n = template.count(PLACEHOLDER)
    if n != 1:
        return [f"prompt template must hold {PLACEHOLDER} exactly once (where the input goes), it holds it {n} times"]
    return []


def stop_problems(stop: object) -> list[str]:
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        return ["stop sequences must be a list of strings"]
    problems = []
    if len(stop) > MAX_STOPS:
        problems.append(f"{len(stop)} stop sequences, at most {MAX_STOPS}")
    if any(not s for s in stop):
        problems.append("a stop sequence is empty")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        problems.append(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
    return problems


def render_prompt(template: str, source: str) -> str:
    return template.replace(PLACEHOLDER, source)


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the earliest stop sequence (excluded), and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


# -- the LM head --------------------------------------------------------------------------------------


def _lm_head_file(source: str | Path | None) -> Path | None:
    """The safetensors file of a model directory that holds `lm_head.weight` (reads headers only)."""
    if source is None or not Path(source).is_dir():
        return None
    from safetensors import safe_open

    for path in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if "lm_head.weight" in f.keys():
                return path
    return None


def lm_head_weight(model: nn.Module, source: str | Path | None = None) -> torch.Tensor | None:
    """The untied LM head's weight (vocab, hidden) from the model directory, or None when tied or absent."""
    if getattr(model.config, "tie_word_embeddings", False):
        return None
    path = _lm_head_file(source)
    if path is None:
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("lm_head.weight").to(torch.float32)


def generation_support(backbone) -> tuple[bool, str]:
    """(can generate, why not): a decoder with a tied LM head or one in its directory."""
    model = backbone.model
    name = type(model).__name__
    if not backbone.is_decoder:
        return False, f"it is an encoder ({name}) with no causal language-model head"
    if getattr(model.config, "tie_word_embeddings", False) or _lm_head_file(backbone.source) is not None:
        return True, ""
    return False, f"its LM head is not tied to the embeddings and {backbone.source} holds no lm_head.weight"


class LMHead(nn.Module):
    """Hidden states to vocabulary logits, with no parameter of its own (nothing here trains or is stored).

    `weight` None: tied, the backbone's input embedding matrix is read at each call (so full fine-tuning,
    which trains the embeddings, moves the head with them); else a frozen buffer.
    """

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        weight = embeddings if self.weight is None else self.weight
        return hidden @ weight.T  # (..., hidden) -> (..., vocab)


class LanguageModel(nn.Module):
    """The backbone and its LM head; `backbone` and `head` are the names the training methods expect."""

    def __init__(self, backbone: nn.Module, head: LMHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, self.backbone.get_input_embeddings().weight)

    def forward(self, input_ids, attention_mask=None, **kw) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        return self.logits(out.last_hidden_state)  # (b, t, vocab)


def language_model(backbone) -> LanguageModel:
    ok, why = generation_support(backbone)
    if not ok:
        raise BitfitError(f"backbone {backbone.source} cannot generate text: {why}")
    return LanguageModel(backbone.model, LMHead(lm_head_weight(backbone.model, backbone.source)))


# -- encoding and the loss ----------------------------------------------------------------------------


def eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids)


def prompt_ids(tokenizer, template: str, sources: list[str]) -> list[list[int]]:
    texts = [render_prompt(template, s) for s in sources]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_pairs(tokenizer, template: str, pairs, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` for (prompt, target) pairs.

    labels = the token itself on target and eos positions, IGNORE on prompt and padding. The prompt and
    the target are tokenised apart, so the prompt's ids are exactly those generation starts from. A
    sequence over `max_length` loses the end of its target (the prompt is kept whole).
    """
    prompts = prompt_ids(tokenizer, template, [p.source for p in pairs])
    targets = tokenizer([p.target for p in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for prompt, target in zip(prompts, targets):
        target = (target + [eos])[: max(1, max_length - len(prompt))]
        rows.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], mask[i, : len(r)], lab[i, : len(l)] = torch.tensor(r), 1, torch.tensor(l)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def lm_loss(model: LanguageModel, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each target token given everything before it; prompt and padding carry none.

    The LM head runs only at the positions that predict a target token (about half of a batch's, and the
    head is a (576 × 49,152) matmul per token on SmolLM2).
    """
    out = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (b, t-1, h): position i predicts token i+1
    labels = batch["labels"][:, 1:]  # (b, t-1)
    where = labels != IGNORE
    logits = model.logits(hidden[where])  # (n, vocab)
    return F.cross_entropy(logits, labels[where], reduction=reduction)


@torch.no_grad()
def dev_loss(model: LanguageModel, tokenizer, template: str, pairs, max_length: int, batch_size: int = 32) -> float:
    """Mean loss per target token over `pairs` (deterministic: no dropout)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = model.backbone.get_input_embeddings().weight.device
    order = sorted(pairs, key=lambda p: len(p.source) + len(p.target))
    for i in range(0, len(order), batch_size):
        batch = encode_pairs(tokenizer, template, order[i : i + batch_size], max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(lm_loss(model, batch, reduction="sum"))
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    return total / max(tokens, 1)


# -- the objective the training loop runs -------------------------------------------------------------


@dataclass
class LMObjective:
    """What `bitfit.train.train` needs for a causal-LM task: the model, a batch's loss, and dev scoring."""

    backbone: object  # bitfit.backbone.Backbone
    template: str
    stop: list[str]

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def max_length(self) -> int:
        return self.backbone.max_length

    def build(self, config) -> LanguageModel:
        model = language_model(self.backbone)
        if config.init:
            start_from_generation_set(self.backbone, config.init)
        return model

    def batch_key(self, pair) -> int:
        return len(pair.source) + len(pair.target)

    def loss(self, model: LanguageModel, batch) -> torch.Tensor:
        device = model.backbone.get_input_embeddings().weight.device
        encoded = encode_pairs(self.tokenizer, self.template, batch, self.max_length)
        return lm_loss(model, {k: v.to(device) for k, v in encoded.items()})

    def evaluate(self, model: LanguageModel, pairs) -> tuple[dict[str, float], float]:
        """Dev metrics and the score that picks the best epoch (higher is better)."""
        loss = dev_loss(model, self.tokenizer, self.template, pairs, self.max_length)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}, -loss


def objective_for(backbone, template: str | None = None, stop: list[str] | None = None) -> LMObjective:
    template = template if template is not None else default_template(backbone.tokenizer)
    stop = list(stop) if stop is not None else list(DEFAULT_STOP)
    problems = template_problems(template) + stop_problems(stop)
    if problems:
        raise DataError("; ".join(problems))
    return LMObjective(backbone, template, stop)


def start_from_generation_set(backbone, path: str) -> None:
    """Write a generation bias set's biases into the backbone (to train further)."""
    from bitfit.bias_set import load_bias_set

    init = load_bias_set(path)
    if not init.is_generation:
        raise DataError(f"--init {path} is a {init.kind} bias set; an lm objective starts from a generation set")
    init.check_backbone(backbone.layout)
    backbone.layout.scatter(backbone.model, init.absolute_biases(backbone.original))


# -- the generation bias set --------------------------------------------------------------------------


def generation_bias_set(backbone, name: str, result, config, train_examples: int):
    """The trained biases (delta from the pre-trained ones) as a generation bias set: no head, the prompt
    template and stop sequences in its metadata."""
    from dataclasses import asdict

    from bitfit.bias_set import GENERATION, BiasSet

    objective = objective_for(backbone, config.prompt_template, config.stop)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    args = asdict(config) | {"best_epoch": result.best_epoch, "train_examples": train_examples,
                             "steps": result.steps, "seconds": round(result.seconds, 1)}
    return BiasSet(
        task=name,
        delta=backbone.layout.gather(backbone.model) - backbone.original,
        head={},
        labels=[],
        fingerprint=backbone.layout.fingerprint,
        method=config.method,
        metrics=metrics | {"trainable": result.trainable, "total": result.total},
        train_args=args,
        injected=list(backbone.injected),
        kind=GENERATION,
        prompt_template=objective.template,
        stop=list(objective.stop),
    )


def model_from_generation_set(backbone, bias_set) -> LanguageModel:
    """The backbone with the set's biases written in place, and its LM head. Checks kind and fingerprint first."""
    if not bias_set.is_generation:
        raise DataError(f"bias set for task {bias_set.task!r} is a {bias_set.kind} set, not a generation set; "
                        "evaluate it with its classification data")
    bias_set.check_backbone(backbone.layout)
    model = language_model(backbone)
    backbone.layout.scatter(backbone.model, bias_set.absolute_biases(backbone.original))
    return model.eval()
