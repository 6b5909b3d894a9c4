"""Training on the real MiniLM: only slots and the head move; the saved file reproduces the dev metric."""

import pytest
import torch

from bitfit.bias_set import load_bias_set, save_bias_set
from bitfit.data import load_task
from bitfit.evaluate import evaluate, task_model_from_bias_set
from bitfit.train import TrainConfig, to_bias_set, train
from conftest import write_rows

pytestmark = pytest.mark.slow


def tiny_sentiment(tmp_path):
    good = ["a wonderful film", "great acting", "i loved it", "superb and moving", "a joy to watch", "brilliant"]
    bad = ["a dull mess", "terrible acting", "i hated it", "boring and slow", "a waste of time", "awful"]
    rows = [[t, "1"] for t in good] + [[t, "0"] for t in bad]
    train_file = write_rows(tmp_path / "train.csv", ["text", "label"], rows * 3, sep=",")
    dev_file = write_rows(tmp_path / "dev.csv", ["text", "label"], rows, sep=",")
    return load_task(train_file, dev_path=dev_file, labels=["0", "1"], task="toy")


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("method", ["bitfit", "head"])
def test_training_moves_only_slots_and_head(fresh_minilm, tmp_path, method):
    bb = fresh_minilm
    before = snapshot(bb.model)
    result = train(bb, tiny_sentiment(tmp_path), TrainConfig(method=method, epochs=1, batch_size=8, lr=1e-2))
    after = snapshot(bb.model)
    slot_params = {f"{s.path}.bias" for s in bb.layout.slots}
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    if method == "bitfit":
        assert moved and moved <= slot_params  # biases moved, every other tensor bit-identical
    else:
        assert moved == set()
    head_before = torch.nn.Linear(bb.hidden_size, 2).weight  # untrained heads are random; a trained one moved
    assert result.model.head.out.weight.shape == head_before.shape
    assert result.steps == 5 and result.best_epoch == 1  # 36 examples, batches of 8


def test_saved_bias_set_reproduces_the_dev_metric(fresh_minilm, minilm_dir, tmp_path):
    from bitfit.backbone import load_backbone

    data = tiny_sentiment(tmp_path)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2)
    result = train(fresh_minilm, data, config)
    bs = to_bias_set(fresh_minilm, data, result, config)
    assert bs.delta.abs().max() > 0 and bs.fingerprint == fresh_minilm.layout.fingerprint
    path = save_bias_set(bs, tmp_path / "toy.safetensors")

    reloaded = load_backbone(minilm_dir)  # a fresh process would see exactly this
    model = task_model_from_bias_set(reloaded, load_bias_set(path))
    again = evaluate(model, reloaded, data.spec, data.dev)
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-9)
    assert bs.metrics["accuracy"] == result.metrics["accuracy"]


def test_training_is_reproducible_for_a_seed(minilm_backbone, tmp_path):
    import copy

    data = tiny_sentiment(tmp_path)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, seed=3)
    a = to_bias_set(bb := copy.deepcopy(minilm_backbone), data, train(bb, data, config), config)
    b = to_bias_set(bb := copy.deepcopy(minilm_backbone), data, train(bb, data, config), config)
    assert torch.equal(a.delta, b.delta)
    assert torch.equal(a.head["out.weight"], b.head["out.weight"])


def test_head_lr_trains_the_head_at_its_own_rate(minilm_backbone, tmp_path):
    import copy

    from bitfit.heads import TaskModel
    from bitfit.train import param_groups

    data = tiny_sentiment(tmp_path)

    def run(lr, head_lr):
        bb = copy.deepcopy(minilm_backbone)
        result = train(bb, data, TrainConfig(epochs=1, batch_size=8, lr=lr, head_lr=head_lr, seed=1))
        return bb.layout.gather(bb.model) - bb.original, result.model.head.out.weight.detach().clone()

    untouched_biases, initial_head = run(0.0, 0.0)  # nothing moves: the seeded initial head
    biases, head = run(1e-2, 0.0)
    assert torch.equal(head, initial_head) and untouched_biases.abs().max() == 0
    assert biases.abs().max() > 0, "the biases trained at lr while the head stood still"
    _, moved_head = run(1e-2, 1e-1)
    assert not torch.equal(moved_head, initial_head)

    model = TaskModel(minilm_backbone.model, train(copy.deepcopy(minilm_backbone), data,
                                                   TrainConfig(epochs=1, lr=0.0)).model.head)
    for p in model.parameters():
        p.requires_grad_(True)
    groups = param_groups(model, 0.01, lr=1e-3, head_lr=5e-2)
    head_ids = {id(p) for p in model.head.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "every parameter in one group"
    for g in groups:
        assert g["lr"] == (5e-2 if id(g["params"][0]) in head_ids else 1e-3)
        assert len({id(p) in head_ids for p in g["params"]}) == 1
        assert g["weight_decay"] == (0.01 if g["params"][0].dim() >= 2 else 0.0)


def test_init_starts_from_a_saved_bias_set_and_refuses_another_task_shape(fresh_minilm, tmp_path):
    from bitfit.errors import DataError
    from bitfit.heads import TaskHead
    from bitfit.train import start_from

    data = tiny_sentiment(tmp_path)
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2)
    bs = to_bias_set(fresh_minilm, data, train(fresh_minilm, data, config), config)
    path = save_bias_set(bs, tmp_path / "toy.safetensors")
    fresh_minilm.reset_biases()
    head = TaskHead(fresh_minilm.hidden_size, 2, "mean")
    start_from(fresh_minilm, head, data.spec, str(path))
    torch.testing.assert_close(fresh_minilm.layout.gather(fresh_minilm.model) - fresh_minilm.original, bs.delta)
    assert torch.equal(head.out.weight, bs.head["out.weight"])
    three = TaskHead(fresh_minilm.hidden_size, 3, "mean")
    spec3 = type(data.spec)("toy", ["a", "b", "c"])
    with pytest.raises(DataError, match="do not match"):
        start_from(fresh_minilm, three, spec3, str(path))
