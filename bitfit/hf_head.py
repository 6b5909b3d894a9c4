"""The task head of a `transformers` model, as the server sees heads: one linear layer on a pooled vector.

`/predict` runs `TaskHead` (`bitfit.heads`): a pooling (mean, first token, the backbone's pre-trained
pooler, last attended token) then one linear layer. A model's own head is servable when it is exactly
that. BERT's sequence classifier reads the pooler output; Llama's and GPT-2's `score` reads the last
token. RoBERTa's two-layer classifier and per-token heads (token classification, language modelling)
train fine with `apply_bitfit` but cannot be served.

Which pooling a head reads is measured, not looked up by class name: one probe forward in which the head's
linear layer passes its input through, so the model's "logits" are the very vector the head read, then
compared with each pooling of the backbone's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitfit.errors import BitfitError
from bitfit.heads import POOLINGS, TaskModel, pool
from bitfit.inject import base_of, head_parameters

SERVABLE = ("a servable head is one linear layer reading a pooled vector: the pooler output "
            "(BertForSequenceClassification's classifier), the first token, the mean of the tokens, or the "
            "last token (LlamaForSequenceClassification's and GPT2ForSequenceClassification's score); "
            "`bitfit train` always trains such a head")
PROBE_LENGTH = 6


class UnservableHead(BitfitError, ValueError):
    """The model's head is not one /predict can run."""


@dataclass(frozen=True)
class LinearHead:
    path: str  # module path in the model, e.g. "classifier" or "score"
    linear: nn.Linear
    pooling: str  # mean | cls | pooler | last

    @property
    def num_outputs(self) -> int:
        return self.linear.out_features


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the modules outside the backbone that hold parameters of their own."""
    outside = {id(p) for _, p in head_parameters(model, base_of(model))}
    return [(path, m) for path, m in model.named_modules()
            if any(id(p) in outside for p in m.parameters(recurse=False))]


def linear_head(model: nn.Module) -> LinearHead:
    """The model's head if /predict can serve it; raises UnservableHead saying why and what can be served."""
    if isinstance(model, TaskModel):  # the bitfit train form: its head is one by construction
        return LinearHead("head.out", model.head.out, model.head.pooling)
    name = type(model).__name__
    modules = head_modules(model)
    if not modules:
        raise UnservableHead(f"{name} has no task head (load it with a head, e.g. "
                             f"AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)); {SERVABLE}")
    if len(modules) > 1 or type(modules[0][1]) is not nn.Linear:
        shown = ", ".join(f"{p} ({type(m).__name__})" for p, m in modules)
        raise UnservableHead(f"the head of {name} ({shown}) is not one linear layer, so /predict cannot serve it "
                             f"(it trains fine with apply_bitfit); {SERVABLE}")
    path, linear = modules[0]
    return LinearHead(path, linear, probe_pooling(model, linear, path))


def probe_ids(model: nn.Module) -> torch.Tensor:
    """(1, PROBE_LENGTH) token ids that are no special token: one unpadded row, so no pad id question arises."""
    config = model.config
    special = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                "decoder_start_token_id"):
        value = getattr(config, key, None)
        special |= set(value) if isinstance(value, (list, tuple)) else {value}
    vocab = base_of(model).get_input_embeddings().num_embeddings
    ids = [i for i in range(3, vocab) if i not in special][: 7 * PROBE_LENGTH : 7]
    if len(ids) < PROBE_LENGTH:
        raise UnservableHead(f"cannot probe the head of {type(model).__name__}: its vocabulary of {vocab} is too small")
    return torch.tensor([ids], device=base_of(model).get_input_embeddings().weight.device)


def probe_pooling(model: nn.Module, linear: nn.Linear, path: str) -> str:
    """Which pooling of the backbone's output the head's linear layer reads (see the module docstring)."""
    base, name = base_of(model), type(model).__name__
    seen = {}

    def keep_base_output(module, args, output):
        seen["base"] = output

    def pass_input_through(module, args, output):
        return args[0]  # the model's logits become the vector its head read

    ids = probe_ids(model)
    mask = torch.ones_like(ids)
    hooks = [base.register_forward_hook(keep_base_output), linear.register_forward_hook(pass_input_through)]
    was_training = model.training
    model.eval()  # dropout off: the read vector must equal the pooled one exactly
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
    except Exception as e:  # a head we cannot run this way is not one we can serve
        raise UnservableHead(f"cannot probe the head of {name} ({type(e).__name__}: {e}); {SERVABLE}") from e
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    read = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
    if read.dim() != 2:
        raise UnservableHead(f"the head of {name} ({path}) is applied to every token (token classification or a "
                             f"language-model head), so /predict cannot serve it; {SERVABLE}")
    hidden, pooler = backbone_outputs(seen.get("base"))
    if hidden is None:
        raise UnservableHead(f"cannot read the token states of {type(base).__name__}; {SERVABLE}")
    for pooling in POOLINGS:
        if pooling == "pooler" and pooler is None:
            continue
        pooled = pool(hidden, mask, pooling, pooler)
        if pooled.shape == read.shape and torch.allclose(pooled.float(), read.float(), rtol=1e-5, atol=1e-6):
            return pooling
    raise UnservableHead(f"the head of {name} ({path}) reads a vector that is none of the poolings {POOLINGS} of "
                         f"the backbone's output, so /predict cannot serve it; {SERVABLE}")


def backbone_outputs(output) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(token states (b, t, h), pooler output (b, h) or None) from a base model's forward output."""
    if output is None:
        return None, None
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state, getattr(output, "pooler_output", None)
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        second = output[1] if len(output) > 1 else None
        return output[0], second if torch.is_tensor(second) and second.dim() == 2 else None
    return None, None
