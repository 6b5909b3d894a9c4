"""The BiasSet file: a round trip keeps every tensor and field; a foreign backbone is named."""

import pytest
import torch

from bitfit.bias_set import BiasSet, load_bias_set, save_bias_set
from bitfit.errors import BackboneMismatch, BiasSetFormatError
from bitfit.layout import layout_of
from conftest import tiny_model


def make_bias_set(layout, labels=("neg", "pos"), seed=0) -> BiasSet:
    g = torch.Generator().manual_seed(seed)
    n = len(labels) or 1
    return BiasSet(
        task="demo",
        delta=torch.randn(layout.size, generator=g),
        head={"out.weight": torch.randn(n, 32, generator=g), "out.bias": torch.randn(n, generator=g)},
        labels=list(labels),
        fingerprint=layout.fingerprint,
        metrics={"accuracy": 0.9},
        train_args={"epochs": 2},
    )


def test_save_load_round_trip(tmp_path):
    layout = layout_of(tiny_model("bert"))
    original = make_bias_set(layout)
    path = save_bias_set(original, tmp_path / "demo.safetensors")
    loaded = load_bias_set(path)
    assert torch.equal(loaded.delta, original.delta)
    assert loaded.head.keys() == original.head.keys()
    for k in original.head:
        assert torch.equal(loaded.head[k], original.head[k])
    for field in ("task", "labels", "fingerprint", "pooling", "method", "metrics", "train_args", "created_at"):
        assert getattr(loaded, field) == getattr(original, field), field
    loaded.check_backbone(layout)
    assert [p.name for p in tmp_path.iterdir()] == ["demo.safetensors"]  # no temporary file left behind


def test_regression_bias_set_has_one_output():
    bs = make_bias_set(layout_of(tiny_model("bert")), labels=())
    assert bs.is_regression and bs.num_outputs == 1
    assert BiasSet.from_bytes(bs.to_bytes()).labels == []


def test_bias_set_from_other_backbone_names_both_fingerprints():
    mine, theirs = layout_of(tiny_model("bert", seed=0)), layout_of(tiny_model("bert", seed=1))
    bs = make_bias_set(theirs)
    with pytest.raises(BackboneMismatch) as err:
        bs.check_backbone(mine)
    assert mine.fingerprint[:16] in str(err.value) and theirs.fingerprint[:16] in str(err.value)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "too short"),
        (b"\x80\x04\x95pickle", "safetensors"),
        (b"not a safetensors file at all", "safetensors"),
    ],
    ids=["empty", "pickle", "text"],
)
def test_garbage_is_not_a_bias_set(data, message):
    with pytest.raises(BiasSetFormatError, match=message):
        BiasSet.from_bytes(data)


def test_plain_safetensors_without_our_metadata_is_refused():
    from safetensors.torch import save

    with pytest.raises(BiasSetFormatError, match="metadata lacks"):
        BiasSet.from_bytes(save({"delta": torch.zeros(3)}))
