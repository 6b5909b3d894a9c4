"""Checkpoints of the methods that are not bias sets (full, lora, random): written, rebuilt, evaluated, refused."""

from __future__ import annotations

import re

import pytest
import torch

from bitfit.checkpoint import is_task_model, load_task_model, save_task_model
from bitfit.errors import BackboneMismatch, BiasSetFormatError
from bitfit.methods import get_method
from bitfit.train import TrainConfig, TrainResult
from conftest import TOLERANCES, tiny_inputs
from test_methods import one_thread, take_steps, task_model, tiny_backbone, tiny_tokenizer, toy_task  # noqa: F401 (fixture)

NOT_SERVABLE = ["full", "lora", "ia3", "random"]



def trained(method: str, tmp_path):
    backbone = tiny_backbone()
    model = task_model(backbone)
    take_steps(model, get_method(method).prepare(model, backbone, 0))
    result = TrainResult(model=model, metrics={"epoch": 1, "seconds": 0.0, "accuracy": 0.5}, best_epoch=1, total=1)
    path = save_task_model(model, backbone, toy_task(), result, TrainConfig(method=method), tmp_path / f"{method}.safetensors")
    return model, path


@pytest.mark.parametrize("method", NOT_SERVABLE, ids=NOT_SERVABLE)
def test_checkpoint_rebuilds_the_trained_model_on_a_fresh_backbone(method, tmp_path):
    model, path = trained(method, tmp_path)
    assert is_task_model(path)
    checkpoint = load_task_model(path)
    assert (checkpoint.method, checkpoint.task, checkpoint.labels) == (method, "toy", ["a", "b"])
    rebuilt = checkpoint.build(tiny_backbone())  # same seed: the same pre-trained weights and fingerprint
    inputs = tiny_inputs()
    expected = model.eval()(**inputs)
    torch.testing.assert_close(rebuilt(**inputs), expected, **TOLERANCES[torch.float32])
    untrained = task_model(tiny_backbone()).eval()
    assert not torch.allclose(untrained(**inputs), expected, atol=1e-4)


def test_checkpoint_is_refused_by_another_backbone(tmp_path):
    _, path = trained("full", tmp_path)
    with pytest.raises(BackboneMismatch, match="full checkpoint"):
        load_task_model(path).build(tiny_backbone(seed=1))


def test_checkpoint_with_a_tensor_the_model_lacks_is_refused(tmp_path):
    _, path = trained("lora", tmp_path)
    checkpoint = load_task_model(path)
    checkpoint.tensors["backbone.encoder.layer.9.attention.self.query.lora_A.default.weight"] = torch.zeros(8, 32)
    with pytest.raises(BiasSetFormatError, match="layer.9.*not a parameter"):
        checkpoint.build(tiny_backbone())


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\xff" * 16], ids=["empty", "text", "huge-header"])
def test_other_files_are_not_task_models(content, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    assert not is_task_model(path)
    with pytest.raises(BiasSetFormatError):
        load_task_model(path)


def test_cli_trains_a_lora_checkpoint_and_eval_reproduces_its_dev_score(tmp_path, capsys):
    from bitfit_cli.main import main

    model_dir = tmp_path / "tiny-bert"
    tiny_backbone().model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    train_csv, dev_csv = tmp_path / "train.csv", tmp_path / "dev.csv"
    for path, n in ((train_csv, 24), (dev_csv, 10)):
        rows = [f"w{(7 * i) % 90} w{(3 * i) % 90} w{i % 90},{'yes' if i % 3 else 'no'}" for i in range(n)]
        path.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "lora.safetensors"
    common = ["--data", str(train_csv), "--dev", str(dev_csv), "--backbone", str(model_dir)]
    assert main(["train", *common, "--task", "toy", "--out", str(out), "--method", "lora", "--epochs", "2",
                 "--lr", "1e-2", "--batch-size", "8", "--threads", "1"]) == 0
    trained_line = capsys.readouterr().out
    assert "lora checkpoint (not a bias set" in trained_line
    assert main(["eval", "--bias-set", str(out), *common]) == 0
    eval_line = capsys.readouterr().out
    score = re.compile(r"toy dev accuracy=(\d\.\d+)")
    assert score.search(eval_line).group(1) == score.search(trained_line).group(1)


@pytest.mark.parametrize("bad,message", [
    (["--max-length", "1"], "--max-length must be at least 2 tokens, not 1"),
    (["--head-lr", "-0.01"], "head-lr must be a number ≥ 0, not -0.01"),
    (["--lr", "nan"], "lr must be a number ≥ 0, not nan"),
], ids=["max-length", "head-lr", "lr"])
def test_train_refuses_bad_option_values_and_writes_nothing(tmp_path, capsys, bad, message):
    from bitfit_cli.main import main

    model_dir = tmp_path / "tiny-bert"
    tiny_backbone().model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "\n".join(f"w{i} w{i + 1},{'yes' if i % 2 else 'no'}" for i in range(20)) + "\n")
    out = tmp_path / "out.safetensors"
    code = main(["train", "--data", str(data), "--backbone", str(model_dir), "--task", "toy", "--out", str(out),
                 "--epochs", "1", *bad])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-bert", "train.csv"]


def test_a_checkpoint_whose_tensors_do_not_fit_the_model_is_refused_before_anything_changes():
    from bitfit.checkpoint import load_trained

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"0.bias": torch.ones(2), "0.weight": torch.ones(2, 4), "1.bias": torch.ones(1)}
    with pytest.raises(BiasSetFormatError, match=r"1\.bias: not a parameter of the model; 0\.weight: shape \(2, 4\), the model has \(2, 3\)"):
        load_trained(model, bad)
    for k, v in model.state_dict().items():  # the fitting 0.bias was not copied either
        assert torch.equal(v, before[k]), k
    load_trained(model, {"0.bias": torch.ones(2)})
    assert torch.equal(model[0].bias, torch.ones(2))
