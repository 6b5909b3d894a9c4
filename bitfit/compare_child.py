"""One comparison run, in its own process: `python -m bitfit.compare_child SPEC_JSON` (the parent is `bitfit compare`).

The child loads the task and the backbone, trains (`bitfit.train`), and prints one result line: the dev
score and metrics, the dev predictions (for standard errors), trainable scalars, step time in wall and CPU
seconds, peak RSS during training (VmHWM, reset after loading), AdamW's state bytes, and a hash of the code.
A selection run trains on the task's train split less a fixed held-out slice and is scored on that slice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bitfit.compare import CHILD_ERROR, CHILD_MARK, TASKS, RunSpec, Settings
from bitfit.errors import BitfitError


def proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS, so the peak read later is training's own (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def holdout(examples: list, share: float) -> tuple[list, list]:
    """(rest, held out): a fixed share of `examples`, the same slice for every method, learning rate and seed."""
    import random

    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    n = max(1, round(len(examples) * share))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def check_device(device: str) -> None:
    """Refuse a device this torch cannot use, with the reason (before any data or model is loaded)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BitfitError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as e:
        raise BitfitError(f"--device {device}: {e}") from None


def code_hash() -> str:
    """A short hash of the bitfit package this process runs, so a report can tell runs made by other code apart."""
    import hashlib

    import bitfit

    h = hashlib.sha256()
    for f in sorted(Path(bitfit.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def encode_predictions(outputs, regression: bool) -> str | list[float]:
    """Dev predictions, compact: class indices as one string of digits, or scores rounded to 4 decimals."""
    if regression:
        return [round(float(v), 4) for v in outputs.reshape(-1)]
    return "".join(str(int(v)) for v in outputs.argmax(-1))


def measure(spec: RunSpec) -> dict:
    """Train one run in this process and return its results entry."""
    import resource

    import torch

    from bitfit.backbone import load_backbone
    from bitfit.data import TaskData, load_task, subset
    from bitfit.evaluate import predict
    from bitfit.methods import get_method, trainable_scalars
    from bitfit.metrics import glue_metrics
    from bitfit.train import TrainConfig, train

    s, seed = spec.settings, spec.run_seed
    check_device(spec.device)
    torch.set_num_threads(s.threads)
    data = load_task(Path(spec.glue_dir) / TASKS[spec.task])
    if spec.stage == "select":
        rest, held = holdout(data.train, s.select_share)
        train_set, dev_set, epochs = subset(rest, s.select_train, seed), subset(held, s.select_dev, 0), s.select_epochs
    else:
        train_set, dev_set, epochs = subset(data.train, s.max_train, seed), subset(data.dev, s.max_dev, seed), s.epochs
    backbone = load_backbone(spec.backbone, max_length=s.max_length)
    n_out = 1 if data.spec.is_regression else len(data.spec.labels)
    total = sum(p.numel() for p in backbone.model.parameters()) + (backbone.hidden_size + 1) * n_out  # before adapters
    rss_before = proc_status("VmRSS")
    peak_scope = "training" if reset_peak_rss() else "process"
    if spec.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(method=spec.method, epochs=epochs, lr=spec.lr, batch_size=s.batch_size, seed=seed,
                         threads=s.threads, keep=s.keep if spec.stage == "final" else "last", device=spec.device)
    result = train(backbone, TaskData(data.spec, train_set, dev_set), config)
    peak = proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda_peak = torch.cuda.max_memory_allocated() if spec.device.startswith("cuda") else None
    outputs = predict(result.model, backbone, dev_set)  # the reported epoch's model
    gold = torch.tensor([e.label for e in dev_set], dtype=torch.float64 if data.spec.is_regression else torch.long)
    metrics = glue_metrics(outputs, gold, data.spec.is_regression)
    trainable = trainable_scalars(result.model)
    return {
        "method": spec.method,
        "task": spec.task,
        "lr": spec.lr,
        "seed": seed,
        "stage": spec.stage,
        "device": spec.device,
        "backbone": spec.backbone or "packaged all-MiniLM-L6-v2",
        "servable": get_method(spec.method).servable,
        "metric": data.spec.metric,
        "score": metrics[data.spec.metric],
        "metrics": metrics,
        "best_epoch": result.best_epoch,  # with keep="last": the last
        "history": result.history,
        "trainable": trainable,
        "total": total,
        "share": trainable / total,
        "train_examples": len(train_set),
        "dev_examples": len(dev_set),
        "dev_pred": encode_predictions(outputs, data.spec.is_regression),
        "dev_gold": encode_predictions(gold.view(-1, 1), True) if data.spec.is_regression else "".join(map(str, gold.tolist())),
        "steps": result.steps,
        "step_seconds": result.step_seconds / max(result.steps, 1),
        "step_cpu_seconds": result.step_cpu_seconds / max(result.steps, 1),
        "train_seconds": result.seconds,
        "peak_rss": peak,
        "rss_before": rss_before,
        "peak_scope": peak_scope,
        "cuda_peak": cuda_peak,
        "optimizer_bytes": result.optimizer_bytes,
        "torch": torch.__version__,
        "code": code_hash(),
        "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def child_main(payload: str) -> int:
    raw = json.loads(payload)
    spec = RunSpec(**(raw | {"settings": Settings(**raw["settings"])}))
    try:
        entry = measure(spec)
    except BitfitError as e:  # a clear reason for the parent's record, not a traceback tail
        print(CHILD_ERROR + str(e), flush=True)
        return 2
    print(CHILD_MARK + json.dumps(entry), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bitfit.compare_child SPEC_JSON (the parent is `bitfit compare`)")
    sys.exit(child_main(sys.argv[1]))
