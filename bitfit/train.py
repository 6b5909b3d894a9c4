"""Training a task: a plain loop in nanoGPT's manner.

AdamW, linear warmup then linear decay, gradient clipping, evaluation on dev after every epoch, and
the best epoch's trainable tensors kept. The objective says what a batch's loss and a dev score are:
"classify" (a head on pooled states; `ClassifyObjective`) or "lm" (causal-LM loss on reference tokens,
`bitfit.lm.LMObjective`); the loop, the methods and the optimizer are the same for both.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bitfit.backbone import Backbone
from bitfit.bias_set import BiasSet
from bitfit.data import Example, TaskData, subset
from bitfit.evaluate import encode_examples, evaluate, format_metrics, primary
from bitfit.heads import TaskHead, TaskModel
from bitfit.inject import count_trainable
from bitfit.methods import get_method, trainable_scalars

log = logging.getLogger(__name__)


OBJECTIVES = ("classify", "lm")


@dataclass
class TrainConfig:
    method: str = "bitfit"
    epochs: int = 3
    lr: float | None = None  # None: the method's default
    head_lr: float | None = None  # None: the same as lr. A fresh head from zero knowledge wants more than the biases
    batch_size: int = 32
    warmup: float = 0.06  # share of steps spent warming up
    weight_decay: float = 0.01  # on head and full-FT weight matrices; never on biases
    clip: float = 1.0
    seed: int = 0
    max_train: int | None = None  # train on a fixed random subset of this many examples
    max_dev: int | None = None
    pooling: str | None = None  # None: the backbone's default
    init: str | None = None  # a bias set to start from (its biases and head), e.g. to train further
    dropout: float = 0.1
    threads: int | None = None
    objective: str = "classify"  # or "lm": causal-LM loss on the target tokens of (prompt, target) pairs
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule decays to zero there)
    prompt_template: str | None = None  # lm: None = the tokenizer's default (`bitfit.lm.default_template`)
    stop: list[str] | None = None  # lm: stop sequences recorded with the bias set; None = `bitfit.lm.DEFAULT_STOP`
    keep: str = "best"  # "best": the epoch with the best dev score; "last": the final epoch, so dev chooses nothing
    device: str = "cpu"  # where the model trains, e.g. "cuda"

    def __post_init__(self):
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', not {self.keep!r}")
        for name in ("lr", "head_lr"):  # refused here, before any data or model is loaded
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name.replace('_', '-')} must be a number ≥ 0, not {value}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be at least 1, not {self.max_steps}")


@dataclass
class TrainResult:
    model: TaskModel
    metrics: dict[str, float]  # dev metrics of the best epoch
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    steps: int = 0
    step_seconds: float = 0.0  # inside training steps only (encode, forward, backward, update): no evaluation
    step_cpu_seconds: float = 0.0  # the same steps in this process's CPU time: what they cost on a shared machine
    optimizer_bytes: int = 0  # AdamW state tensors at the end of training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def example_length(e: Example) -> int:
    return len(e.text) + len(e.pair or "")


def shuffled_batches(examples: list, batch_size: int, rng: random.Random, key=example_length) -> list[list]:
    """Random batches of similar length: shuffle, sort within chunks of 50 batches, shuffle the batches."""
    order = examples[:]
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=key)
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_lambda(total: int, warmup: float):
    warm = max(1, int(total * warmup))

    def f(step: int) -> float:
        if step < warm:  # 1) linear warmup
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))  # 2) linear decay to zero

    return f


def loss_fn(outputs: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(outputs.squeeze(-1), labels.float())
    return F.cross_entropy(outputs, labels.long())


def param_groups(model: TaskModel, weight_decay: float, lr: float | None = None, head_lr: float | None = None) -> list[dict]:
    """AdamW groups: decay on matrices only; the head at its own learning rate when one is given.

    A group without "lr" takes the optimizer's."""
    head = {id(p) for p in model.head.parameters()} if head_lr is not None else set()
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.dim() >= 2), []).append(p)
    out = []
    for (is_head, matrix), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if matrix else 0.0}
        rate = head_lr if is_head else lr
        if rate is not None:
            group["lr"] = rate
        out.append(group)
    return out


def start_from(backbone: Backbone, head: TaskHead, spec, path: str) -> None:
    """Load a bias set's biases into the backbone and its head into `head` (same task shape and pooling)."""
    from bitfit.bias_set import load_bias_set
    from bitfit.errors import DataError

    init = load_bias_set(path)
    init.check_backbone(backbone.layout)
    if list(init.labels) != list(spec.labels) or init.pooling != head.pooling:
        raise DataError(f"--init {path}: labels {init.labels} / pooling {init.pooling!r} do not match the task's "
                        f"{spec.labels} / {head.pooling!r}")
    backbone.layout.scatter(backbone.model, init.absolute_biases(backbone.original))
    head.load_state_dict(init.head)


@dataclass
class ClassifyObjective:
    """A head on pooled states, cross-entropy (or MSE for regression); dev scored by the task's metric."""

    backbone: Backbone
    spec: object  # bitfit.data.TaskSpec

    batch_key = staticmethod(example_length)

    def build(self, config: TrainConfig) -> TaskModel:
        spec, backbone = self.spec, self.backbone
        head = TaskHead(backbone.hidden_size, 1 if spec.is_regression else len(spec.labels), config.pooling or backbone.pooling, config.dropout)
        if config.init:
            start_from(backbone, head, spec, config.init)
        return TaskModel(backbone.model, head)

    def loss(self, model: TaskModel, batch: list[Example]) -> torch.Tensor:
        device = model.head.out.weight.device
        inputs = {k: v.to(device) for k, v in encode_examples(self.backbone, batch).items()}
        labels = torch.tensor([e.label for e in batch], device=device)
        return loss_fn(model(**inputs), labels, self.spec.is_regression)

    def evaluate(self, model: TaskModel, examples: list[Example]) -> tuple[dict[str, float], float]:
        metrics = evaluate(model, self.backbone, self.spec, examples)
        return metrics, primary(metrics, self.spec)


def objective_of(backbone: Backbone, data, config: TrainConfig):
    if config.objective == "lm":
        from bitfit.lm import objective_for

        return objective_for(backbone, config.prompt_template, config.stop)
    return ClassifyObjective(backbone, data.spec)


def train(backbone: Backbone, data: TaskData, config: TrainConfig) -> TrainResult:
    """Train one task on `backbone` (modified in place) and return the best epoch's model.

    `data` is a `TaskData` for "classify", a `bitfit.e2e.GenerationData` for "lm"."""
    method = get_method(config.method)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    objective = objective_of(backbone, data, config)
    train_set = subset(data.train, config.max_train, config.seed)
    dev_set = subset(data.dev, config.max_dev, config.seed)
    model = objective.build(config).to(config.device)  # before prepare: masks and adapters are made beside the weights
    after_step = method.prepare(model, backbone, config.seed)  # None, or a hook some methods need after each update
    n_train, n_total, _ = count_trainable(model)
    n_train = trainable_scalars(model)  # partly trained tensors (random) count only their trainable entries
    if n_train == 0:  # e.g. --method head on an lm objective, whose LM head is the frozen embeddings
        from bitfit.errors import BitfitError

        raise BitfitError(f"method {method.name} trains nothing for the {config.objective} objective; choose another")
    pct = 100.0 * n_train / max(n_total, 1)
    print(f"method {method.name}: trainable {n_train:,} / {n_total:,} ({pct:.2f} %)")

    lr = config.lr if config.lr is not None else method.lr
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, lr, config.head_lr), lr=lr)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, config.warmup))
    rng = random.Random(config.seed)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    best, best_score, best_epoch, history = None, -math.inf, 0, []
    start, step, step_seconds, step_cpu = time.perf_counter(), 0, 0.0, 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        batches = shuffled_batches(train_set, config.batch_size, rng, objective.batch_key)[: total_steps - step]
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}")
        for batch in bar:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = objective.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            scheduler.step()
            step += 1
            step_seconds += time.perf_counter() - t0
            step_cpu += time.process_time() - c0
            bar.set_postfix(loss=f"{loss.item():.4f}")
        metrics, score = objective.evaluate(model, dev_set)
        history.append({"epoch": epoch, "seconds": round(time.perf_counter() - start, 1), **metrics})
        print(f"epoch {epoch}: dev {format_metrics(metrics)}")
        if config.keep == "last":
            best_epoch = epoch
        elif score > best_score:
            best_score, best_epoch = score, epoch
            best = {n: p.detach().clone() for n, p in trainable}
        if step >= total_steps:  # --max-steps ended training inside this epoch
            break
    if best is not None:
        with torch.no_grad():  # keep the best epoch, not the last
            for n, p in trainable:
                p.copy_(best[n])
    model.eval()
    return TrainResult(
        model=model,
        metrics=history[best_epoch - 1] | {},
        best_epoch=best_epoch,
        history=history,
        trainable=n_train,
        total=n_total,
        seconds=time.perf_counter() - start,
        steps=step,
        step_seconds=step_seconds,
        step_cpu_seconds=step_cpu,
        optimizer_bytes=sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                            if torch.is_tensor(t)),
    )


def to_bias_set(backbone: Backbone, data: TaskData, result: TrainResult, config: TrainConfig) -> BiasSet:
    """The trained biases as a delta from the pre-trained ones, with the head and what produced them."""
    if config.objective == "lm":  # a generation set: no head; the prompt template and stop sequences instead
        from bitfit.lm import generation_bias_set

        return generation_bias_set(backbone, data.name, result, config, min(len(data.train), config.max_train or len(data.train)))
    delta = backbone.layout.gather(backbone.model) - backbone.original
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    args = asdict(config) | {
        "best_epoch": result.best_epoch,
        "train_examples": min(len(data.train), config.max_train or len(data.train)),
        "seconds": round(result.seconds, 1),
    }
    return BiasSet(
        task=data.spec.name,
        delta=delta,
        head={k: v.detach().clone() for k, v in result.model.head.state_dict().items()},
        labels=list(data.spec.labels),
        fingerprint=backbone.layout.fingerprint,
        pooling=result.model.head.pooling,
        method=config.method,
        metrics=metrics | {"trainable": result.trainable, "total": result.total},
        train_args=args,
        injected=list(backbone.injected),
        input_kind="pair" if data.has_pairs else "text",  # the server refuses the other kind
    )
