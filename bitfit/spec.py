"""The serving spec: everything a bias set must match to be served on one loaded backbone.

It is derived once from the loaded backbone (`ServingSpec.of`), and its one check, `problems`, is what
both the store's validation (`bias_store.validate`, before a byte is written) and the bank's loading
(`server.runtime.bank`, before a row is claimed) call. So a bias set the store accepts is one the bank
can load: an upload is never acknowledged for a set that cannot go live.

The check reads only what a safetensors header already says (metadata strings and tensor shapes), so
the store runs it on an upload before deserialising any tensor, and the bank runs it on a `BiasSet`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bitfit.bias_set import CLASSIFICATION, DELTA, GENERATION, HEAD_PREFIX, INPUT_KINDS, BiasSet
from bitfit.heads import POOLINGS
from bitfit.layout import BiasLayout

WEIGHT, BIAS = HEAD_PREFIX + "out.weight", HEAD_PREFIX + "out.bias"


@dataclass(frozen=True)
class ServingSpec:
    fingerprint: str  # of the backbone's architecture, slots and frozen weights (see `bitfit.layout`)
    layout_size: int  # bias scalars in the flat vector
    hidden: int  # width of the pooled vector a head reads
    has_pooler: bool  # a pre-trained pooler exists, so pooling "pooler" is possible
    decoder: bool = False  # causal LM backbone (pooling "last" is its default)
    generates: bool = False  # the backbone can generate text: a decoder with an LM head (`bitfit.lm`)
    why_not_generate: str = "this spec was made without a model that has a language-model head"  # shown when a generation set is refused

    @classmethod
    def of(cls, backbone) -> "ServingSpec":
        """The spec of a loaded `bitfit.backbone.Backbone` (after injection, before any cast)."""
        from bitfit.lm import generation_support

        ok, why = generation_support(backbone)
        return cls(
            fingerprint=backbone.layout.fingerprint,
            layout_size=backbone.layout.size,
            hidden=backbone.hidden_size,
            has_pooler=getattr(backbone.model, "pooler", None) is not None,
            decoder=backbone.is_decoder,
            generates=ok,
            why_not_generate=why,
        )

    @classmethod
    def for_layout(cls, layout: BiasLayout, hidden: int, *, has_pooler: bool = True, decoder: bool = False,
                   generates: bool = False) -> "ServingSpec":
        """A spec from a layout alone, for tools and tests that have no loaded model."""
        return cls(layout.fingerprint, layout.size, hidden, has_pooler, decoder, generates)

    @property
    def poolings(self) -> tuple[str, ...]:
        """The poolings a head may use on this backbone."""
        return tuple(p for p in POOLINGS if p != "pooler" or self.has_pooler)

    def problems(self, meta: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> list[str]:
        """Everything that stops a bias set (its metadata and tensor shapes) from being served here.

        Only the backbone-dependent facts are checked; the file's own consistency (format, dtypes, labels,
        finite values) is `bias_store.validate`'s. Every problem is one sentence; empty when it fits.
        """
        problems = []
        fp = meta.get("backbone_fingerprint")
        if fp is not None and fp != self.fingerprint:
            problems.append(
                f"bias set was trained on backbone {fp[:16]}… but this server runs backbone {self.fingerprint[:16]}…; "
                "a bias set only applies to the exact backbone it was trained on"
            )
        size = meta.get("layout_size")
        if size is not None and size != str(self.layout_size):
            problems.append(f"metadata layout_size is {size[:16]!r}, the backbone has {self.layout_size} bias scalars")
        kind = meta.get("kind", CLASSIFICATION)
        if kind == GENERATION and not self.generates:
            problems.append(f"this is a generation bias set, and this server's backbone cannot generate text: "
                            f"{self.why_not_generate}; serve it with the decoder backbone it was trained on")
        problems += shape_problems(shapes, outputs_of(meta), self.layout_size, self.hidden)
        pooling = meta.get("pooling")
        if pooling == "pooler" and not self.has_pooler:
            problems.append("pooling 'pooler' needs a backbone with a pre-trained pooler, and this one has none; "
                            f"retrain with one of {', '.join(self.poolings)}")
        elif pooling is not None and pooling not in self.poolings:
            problems.append(f"unknown pooling {pooling[:32]!r}; choose one of {', '.join(self.poolings)}")
        return problems

    def check(self, bias_set: BiasSet) -> list[str]:
        """`problems` for a parsed bias set."""
        return self.problems(bias_set.metadata(), {k: tuple(v.shape) for k, v in bias_set.tensors().items()})


def outputs_of(meta: Mapping[str, str]) -> int | None:
    """Head outputs implied by the metadata's labels (1 for regression), None when they cannot be read."""
    try:
        labels = json.loads(meta.get("labels", "null"))
    except (json.JSONDecodeError, RecursionError, TypeError):
        return None
    return (len(labels) or 1) if isinstance(labels, list) else None


def shape_problems(
    shapes: Mapping[str, Sequence[int]], n_out: int | None, layout_size: int | None = None, hidden: int | None = None
) -> list[str]:
    """delta [layout size], head.out.weight [n_out, hidden], head.out.bias [n_out]; a None size is not checked."""
    problems = []
    why = "the number of labels, 1 for regression"
    for name, want, what in (
        (DELTA, [layout_size], "one value per bias scalar of the backbone"),
        (WEIGHT, [n_out, hidden], f"[{why}, hidden size]"),
        (BIAS, [n_out], why),
    ):
        if name not in shapes:
            continue
        got = list(shapes[name])
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            shown = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
            problems.append(f"tensor {name!r} has shape {got}, expected {shown} ({what})")
    w, b = shapes.get(WEIGHT), shapes.get(BIAS)
    if n_out is None and w is not None and b is not None and list(w)[:1] != list(b)[:1]:
        problems.append(f"head.out.bias has {list(b)} rows but head.out.weight has {list(w)}")
    return problems


__all__ = ["INPUT_KINDS", "ServingSpec", "outputs_of", "shape_problems"]
