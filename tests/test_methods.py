"""The training methods' plumbing on tiny models: what each one moves, and what it must leave bit-identical."""

from __future__ import annotations

import pytest
import torch

from bitfit.backbone import finish_backbone
from bitfit.data import Example, TaskData, TaskSpec
from bitfit.errors import BitfitError
from bitfit.heads import TaskHead, TaskModel
from bitfit.methods import METHODS, bq_bm2_slots, get_method, prepare_random, trainable_scalars
from bitfit.train import TrainConfig, loss_fn, param_groups, train
from conftest import tiny_inputs, tiny_model

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]  # 99 = the tiny vocab


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the test machine's other core stays free."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def tiny_backbone(kind: str = "bert", seed: int = 0):
    return finish_backbone(tiny_model(kind, seed), tiny_tokenizer(), f"tiny-{kind}")


def task_model(backbone, n_out: int = 2) -> TaskModel:
    return TaskModel(backbone.model, TaskHead(backbone.hidden_size, n_out, backbone.pooling))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def take_steps(model: TaskModel, after_step, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.01) -> None:
    """train.py's update, on random token batches: AdamW with its parameter groups (decay on matrices), clipping."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    model.train()
    for i in range(steps):
        loss = loss_fn(model(**tiny_inputs(seed=i + 1)), torch.tensor([0, 1, 1]), regression=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        if after_step is not None:
            after_step()
    model.eval()


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def toy_task(n: int = 12) -> TaskData:
    g = torch.Generator().manual_seed(0)
    examples = [Example(" ".join(f"w{int(i)}" for i in torch.randint(0, 94, (6,), generator=g)), None, k % 2) for k in range(n)]
    return TaskData(TaskSpec("toy", ["a", "b"], {"a": 0, "b": 1}), examples, examples[:4])


def test_every_registered_method_has_a_grid_holding_its_default():
    for m in METHODS.values():
        assert m.lr in m.grid, m.name


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="bq-bm2.*random"):
        get_method("bitfitt")


# --- random -------------------------------------------------------------------------------------


def test_random_trains_exactly_as_many_scalars_as_bitfit_and_leaves_the_rest_bit_identical():
    backbone = tiny_backbone()
    before = snapshot(backbone.model)
    # the real loop: weight decay 0.01 on matrices, which would shrink masked entries without the step hook
    result = train(backbone, toy_task(), TrainConfig(method="random", epochs=2, lr=1e-2, batch_size=4, threads=1))
    masked = {n: p for n, p in backbone.model.named_parameters() if getattr(p, "bitfit_mask", None) is not None}
    assert sum(int(p.bitfit_mask.sum()) for p in masked.values()) == backbone.layout.size
    assert result.trainable == trainable_scalars(result.model) == backbone.layout.size + sum(p.numel() for p in result.model.head.parameters())
    moved = 0
    for name, p in backbone.model.named_parameters():
        if name not in masked:
            assert torch.equal(p.detach(), before[name]), name
            continue
        mask = p.bitfit_mask
        assert torch.equal(p.detach()[~mask], before[name][~mask]), f"{name}: an entry outside the mask moved"
        moved += int((p.detach()[mask] != before[name][mask]).sum())
    assert 0 < moved <= backbone.layout.size


def test_weight_decay_moves_masked_entries_when_the_step_hook_is_skipped():
    """Why `random` returns a step hook: zeroed gradients alone do not keep AdamW's decay off frozen entries."""
    backbone = tiny_backbone()
    model = task_model(backbone)
    before = snapshot(backbone.model)
    prepare_random(model, backbone, seed=0)
    take_steps(model, after_step=None)
    drifted = [n for n, p in backbone.model.named_parameters()
               if getattr(p, "bitfit_mask", None) is not None and not torch.equal(p.detach()[~p.bitfit_mask], before[n][~p.bitfit_mask])]
    assert drifted


def test_random_draw_is_fixed_by_the_seed():
    def draw(seed):
        backbone = tiny_backbone()
        prepare_random(task_model(backbone), backbone, seed)
        return {n: p.bitfit_mask for n, p in backbone.model.named_parameters() if getattr(p, "bitfit_mask", None) is not None}

    a, b, c = draw(0), draw(0), draw(1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(n not in c or not torch.equal(a[n], c[n]) for n in a)


# --- bq-bm2 -------------------------------------------------------------------------------------

# per family: (query bias paths, MLP-intermediate bias paths), {i} the layer; c_attn holds q|k|v, so only its first third
BQ_BM2_CASES = {
    "bert": (["encoder.layer.{i}.attention.self.query"], ["encoder.layer.{i}.intermediate.dense"]),
    "roberta": (["encoder.layer.{i}.attention.self.query"], ["encoder.layer.{i}.intermediate.dense"]),
    "distilbert": (["transformer.layer.{i}.attention.q_lin"], ["transformer.layer.{i}.ffn.lin1"]),
    "gpt2": (["h.{i}.attn.c_attn"], ["h.{i}.mlp.c_fc"]),
    "llama": (["layers.{i}.self_attn.q_proj"], ["layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"]),
    "t5": (["encoder.block.{i}.layer.0.SelfAttention.q"], ["encoder.block.{i}.layer.1.DenseReluDense.wi"]),
}


@pytest.mark.parametrize("kind", list(BQ_BM2_CASES), ids=list(BQ_BM2_CASES))
def test_bq_bm2_moves_only_query_and_mlp_intermediate_biases(kind):
    backbone = tiny_backbone(kind)
    queries, mlps = BQ_BM2_CASES[kind]
    expected = {f"{p.format(i=i)}.bias" for i in range(2) for p in queries + mlps}
    model = task_model(backbone)
    before, head_before = snapshot(backbone.model), snapshot(model.head)
    hook = get_method("bq-bm2").prepare(model, backbone, 0)
    take_steps(model, hook)
    assert changed(before, backbone.model) == expected
    assert changed(head_before, model.head) == {"out.weight", "out.bias"}
    if kind == "gpt2":
        for i in range(2):
            bias, old = backbone.model.get_submodule(f"h.{i}.attn.c_attn").bias.detach(), before[f"h.{i}.attn.c_attn.bias"]
            third = old.numel() // 3
            assert not torch.equal(bias[:third], old[:third])
            assert torch.equal(bias[third:], old[third:]), "key and value biases must stay"


def test_bq_bm2_refuses_a_model_without_query_or_mlp_slots():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)
            self.spread = torch.nn.Linear(4, 8)

    from bitfit.backbone import Backbone
    from bitfit.layout import layout_of

    model = Odd()
    backbone = Backbone(model=model, tokenizer=None, layout=layout_of(model), source="odd")
    with pytest.raises(BitfitError, match=r"0 query and 0 MLP.*\['mix', 'spread'\]"):
        bq_bm2_slots(backbone)


# --- lora, head, full, bitfit -------------------------------------------------------------------


def test_lora_leaves_every_base_weight_unchanged_and_moves_adapters_and_head():
    backbone = tiny_backbone()
    before = {n: t.clone() for n, t in backbone.model.state_dict().items()}
    model = task_model(backbone)
    head_before = snapshot(model.head)
    inputs = tiny_inputs()
    base_out = model(**inputs).detach()
    hook = get_method("lora").prepare(model, backbone, 0)
    take_steps(model, hook)
    after = backbone.model.state_dict()
    for name, old in before.items():
        # PEFT moves a wrapped layer's own tensors under `.base_layer`
        new = after.get(name)
        if new is None:
            module, leaf = name.rsplit(".", 1)
            new = after[f"{module}.base_layer.{leaf}"]
        assert torch.equal(new, old), name
    adapters = {n for n in after if ".lora_" in n}
    assert adapters and {n.split(".lora_")[0] for n in adapters} == {f"encoder.layer.{i}.attention.self.{w}" for i in range(2) for w in ("query", "value")}
    assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in adapters if "lora_B" in n)
    assert changed(head_before, model.head) == {"out.weight", "out.bias"}
    model.head.load_state_dict(head_before)
    assert not torch.allclose(model(**inputs), base_out), "the adapters must change the outputs"


def test_head_moves_only_the_head():
    backbone = tiny_backbone()
    model = task_model(backbone)
    before, head_before = snapshot(backbone.model), snapshot(model.head)
    take_steps(model, get_method("head").prepare(model, backbone, 0))
    assert changed(before, backbone.model) == set()
    assert changed(head_before, model.head) == {"out.weight", "out.bias"}


def test_full_moves_every_weight_matrix_the_loss_depends_on():
    backbone = tiny_backbone()
    model = task_model(backbone)
    before = snapshot(backbone.model)
    take_steps(model, get_method("full").prepare(model, backbone, 0))
    # mean pooling never reads BERT's pooler, so it gets no gradient and AdamW skips it
    matrices = {n for n, p in backbone.model.named_parameters() if p.dim() >= 2 and not n.startswith("pooler.")}
    assert matrices <= changed(before, backbone.model)
    assert trainable_scalars(model) == sum(p.numel() for p in model.parameters())


def test_bitfit_moves_only_bias_slots_and_head():
    backbone = tiny_backbone()
    model = task_model(backbone)
    before = snapshot(backbone.model)
    take_steps(model, get_method("bitfit").prepare(model, backbone, 0))
    slots = {f"{s.path}.bias" for s in backbone.layout.slots}
    moved = changed(before, backbone.model)
    assert moved and moved <= slots
    assert trainable_scalars(model) == backbone.layout.size + sum(p.numel() for p in model.head.parameters())


# --- ia3 ----------------------------------------------------------------------------------------

# per family: the key/value projections and the MLP's down projection (whose input (IA)^3 scales), {i} the layer
IA3_CASES = {
    "bert": (["encoder.layer.{i}.attention.self.key", "encoder.layer.{i}.attention.self.value"], ["encoder.layer.{i}.output.dense"]),
    "distilbert": (["transformer.layer.{i}.attention.k_lin", "transformer.layer.{i}.attention.v_lin"], ["transformer.layer.{i}.ffn.lin2"]),
    "llama": (["layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj"], ["layers.{i}.mlp.down_proj"]),
    "t5": (["encoder.block.{i}.layer.0.SelfAttention.k", "encoder.block.{i}.layer.0.SelfAttention.v"], ["encoder.block.{i}.layer.1.DenseReluDense.wo"]),
}


@pytest.mark.parametrize("kind", list(IA3_CASES), ids=list(IA3_CASES))
def test_ia3_targets_keys_values_and_the_mlp_down_projection_never_the_attention_output(kind):
    from bitfit.methods import ia3_targets

    kv, down = IA3_CASES[kind]
    targets, feedforward = ia3_targets(tiny_model(kind))
    assert sorted(targets) == sorted(p.format(i=i) for i in range(2) for p in kv + down)
    assert sorted(feedforward) == sorted(p.format(i=i) for i in range(2) for p in down)
    assert not any("attention.output" in t for t in targets)


def test_ia3_refuses_a_model_without_separate_key_and_value_projections():
    from bitfit.methods import ia3_targets

    with pytest.raises(BitfitError, match=r"ia3: no key/value.*\['c_attn', 'c_fc', 'c_proj'\]"):
        ia3_targets(tiny_model("gpt2"))


def test_ia3_leaves_every_base_weight_unchanged_and_moves_its_vectors_and_the_head():
    from peft.tuners.ia3 import IA3Layer

    backbone = tiny_backbone()
    before = {n: t.clone() for n, t in backbone.model.state_dict().items()}
    model = task_model(backbone)
    head_before = snapshot(model.head)
    inputs = tiny_inputs()
    base_out = model.eval()(**inputs).detach()
    hook = get_method("ia3").prepare(model, backbone, 0)
    layers = {p: m for p, m in backbone.model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(layers) == sorted(f"encoder.layer.{i}.{w}" for i in range(2)
                                    for w in ("attention.self.key", "attention.self.value", "output.dense"))
    # the MLP's vector scales the down projection's input (intermediate size 37), the others its output (32)
    assert {p: m.is_feedforward for p, m in layers.items()} == {p: p.endswith("output.dense") for p in layers}
    assert {p: m.ia3_l["default"].numel() for p, m in layers.items()} == {p: 37 if p.endswith("output.dense") else 32 for p in layers}
    torch.testing.assert_close(model(**inputs), base_out)  # vectors start at one: outputs unchanged until trained
    assert trainable_scalars(model) == 2 * (32 + 32 + 37) + sum(p.numel() for p in model.head.parameters())
    take_steps(model, hook)
    after = backbone.model.state_dict()
    for name, old in before.items():
        new = after.get(name)
        if new is None:  # PEFT moves a wrapped layer's own tensors under `.base_layer`
            module, leaf = name.rsplit(".", 1)
            new = after[f"{module}.base_layer.{leaf}"]
        assert torch.equal(new, old), name
    assert all(not torch.equal(m.ia3_l["default"].detach(), torch.ones_like(m.ia3_l["default"])) for m in layers.values())
    assert changed(head_before, model.head) == {"out.weight", "out.bias"}
    model.head.load_state_dict(head_before)
    assert not torch.allclose(model(**inputs), base_out), "the vectors must change the outputs"
