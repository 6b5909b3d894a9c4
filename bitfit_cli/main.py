"""The `bitfit` command: train, eval, compare, serve, and the admin client (push, list, ...).

Each subcommand imports what it needs when it runs, so `bitfit train` never loads FastAPI.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="local Hugging Face model directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--inject", help="comma-separated projection names that get zero biases where they have none "
                   "(default: every bias-less linear layer)")
    p.add_argument("--max-length", type=int, help="tokens per input; longer inputs are truncated (default: 128)")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="GLUE task folder (train.tsv/dev.tsv), or a .csv / .jsonl file")
    p.add_argument("--dev", help="dev file for a CSV/JSONL task (default: hold out 10 %% of --data)")
    p.add_argument("--text-column", help="column (or JSONL key) of the text (default: text)")
    p.add_argument("--pair-column", help="column of the second text, for sentence-pair tasks")
    p.add_argument("--label-column", help="column of the label (default: label)")
    p.add_argument("--labels", help="comma-separated class names in output order (default: sorted distinct labels)")
    p.add_argument("--regression", action="store_true", help="the label is a real number (like STS-B)")


def add_prompt(p) -> None:
    p.add_argument("--prompt-template", help="lm: the prompt, {input} where the meaning representation goes "
                   "(default: a ChatML instruction where the tokenizer knows ChatML; \\n is a newline)")
    p.add_argument("--stop", action="append", help="lm: a stop sequence (repeat for more; default: \\n)")


def load_data(args, task=None):
    from bitfit.data import load_task

    return load_task(
        args.data,
        task=task,
        text_column=args.text_column,
        pair_column=args.pair_column,
        label_column=args.label_column,
        labels=args.labels.split(",") if args.labels else None,
        regression=args.regression,
        dev_path=args.dev,
    )


def load_backbone_from(args):
    from bitfit.backbone import load_backbone
    from bitfit.errors import BitfitError

    inject = args.inject.split(",") if getattr(args, "inject", None) else None
    max_length = getattr(args, "max_length", None)
    if max_length is not None and max_length < 2:
        raise BitfitError(f"--max-length must be at least 2 tokens, not {max_length}")
    return load_backbone(args.backbone, inject=inject, **({"max_length": max_length} if max_length else {}))


def unescape(text: str) -> str:
    """`\\n` typed on a command line is a newline in a stop sequence or a template."""
    import codecs

    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def cmd_train(args) -> int:
    from bitfit.bias_set import save_bias_set
    from bitfit.evaluate import format_metrics
    from bitfit.methods import get_method
    from bitfit.train import TrainConfig, to_bias_set, train

    method = get_method(args.method)
    lm = args.objective == "lm"
    config = TrainConfig(
        method=args.method, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size, seed=args.seed,
        max_train=args.max_train, max_dev=args.max_dev, pooling=args.pooling, threads=args.threads, init=args.init,
        **({"objective": "lm", "prompt_template": unescape(args.prompt_template) if args.prompt_template else None,
            "stop": [unescape(s) for s in args.stop] if args.stop else None} if lm else {}),
        **({"max_steps": args.max_steps} if args.max_steps is not None else {}),
    )
    if lm:
        return train_generation(args, config, method)
    data = load_data(args, task=args.task)
    backbone = load_backbone_from(args)
    result = train(backbone, data, config)
    if method.servable:
        save_bias_set(to_bias_set(backbone, data, result, config), args.out)
        what = "bias set"
    else:
        from bitfit.checkpoint import save_task_model

        save_task_model(result.model, backbone, data, result, config, args.out)
        what = f"{method.name} checkpoint (not a bias set: it cannot be served)"
    metrics = {k: v for k, v in result.metrics.items() if k not in ("epoch", "seconds")}
    print(f"wrote {what} to {args.out}")
    print(f"{data.spec.name} dev {data.spec.metric}={metrics[data.spec.metric]:.4f} ({format_metrics(metrics)}) "
          f"best epoch {result.best_epoch}/{config.epochs}, {result.steps} steps, {result.seconds:.0f} s")
    return 0


def train_generation(args, config, method) -> int:
    """`bitfit train --objective lm`: a generation bias set (BitFit) or an LM checkpoint (full, lora)."""
    from bitfit.bias_set import save_bias_set
    from bitfit.e2e import load_generation_data
    from bitfit.lm import objective_for
    from bitfit.lm_checkpoint import save_lm_model
    from bitfit.train import to_bias_set, train

    data = load_generation_data(args.data, task=args.task)
    backbone = load_backbone_from(args)
    result = train(backbone, data, config)
    if method.servable:
        save_bias_set(to_bias_set(backbone, data, result, config), args.out)
        what = "generation bias set"
    else:
        objective = objective_for(backbone, config.prompt_template, config.stop)
        save_lm_model(result.model, backbone, data.name, result, config, objective.template, objective.stop, args.out,
                      train_examples=min(len(data.train), config.max_train or len(data.train)))
        what = f"{method.name} checkpoint (not a bias set: it cannot be served)"
    print(f"wrote {what} to {args.out}")
    print(f"{data.name} dev loss={result.metrics['loss']:.4f} (perplexity {result.metrics['perplexity']:.2f}) "
          f"best epoch {result.best_epoch}/{config.epochs}, {result.steps} steps, {result.seconds:.0f} s")
    return 0


def eval_generation(args, bias_set=None, checkpoint=None) -> int:
    """BLEU on an E2E split: a generation bias set, an LM checkpoint, or (--base) the backbone zero-shot."""
    import json

    from bitfit.bleu import evaluate_bleu
    from bitfit.data import subset
    from bitfit.e2e import group_references, load_generation_data
    from bitfit.errors import BitfitError
    from bitfit.files import write_atomic
    from bitfit.lm import language_model, model_from_generation_set, objective_for

    if args.beams < 1:
        raise BitfitError(f"--beams must be at least 1, not {args.beams}")
    data = load_generation_data(args.data)
    split = args.split or "test"
    pairs = getattr(data, split)
    if not pairs:
        raise BitfitError(f"{args.data} has no {split} split")
    grouped = subset(group_references(pairs), args.max_test, 0)
    backbone = load_backbone_from(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if bias_set is not None:
        model, template, stop, what = model_from_generation_set(backbone, bias_set), bias_set.prompt_template, bias_set.stop, bias_set.task
    elif checkpoint is not None:
        model, template, stop, what = checkpoint.build(backbone), checkpoint.prompt_template, checkpoint.stop, checkpoint.task
    else:  # the base model zero-shot, prompted as a trained set would be
        objective = objective_for(backbone, unescape(args.prompt_template) if args.prompt_template else None,
                                  [unescape(s) for s in args.stop] if args.stop else None)
        model, template, stop, what = language_model(backbone).eval(), objective.template, objective.stop, "base model"
    result = evaluate_bleu(model, backbone.tokenizer, grouped, template=template, stop=stop, beams=args.beams,
                           max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                           batch_size=args.batch_size or 64)
    print(f"{what} {split} BLEU {result['bleu']:.2f} ({result['decoding']}, {result['inputs']} inputs, "
          f"{result['references']} references; sacrebleu {result['signature']}) in {result['seconds']:.0f} s")
    if args.predictions:
        write_atomic(args.predictions, "".join(o.replace("\n", " ") + "\n" for o in result["outputs"]).encode())
    if args.json:
        write_atomic(args.json, (json.dumps(result | {"model": what, "split": split, "source": args.bias_set or "base"},
                                            indent=1) + "\n").encode())
    return 0


def cmd_eval(args) -> int:
    from bitfit.bias_set import load_bias_set
    from bitfit.checkpoint import is_task_model, load_task_model
    from bitfit.errors import BitfitError
    from bitfit.evaluate import evaluate, format_metrics, task_model_from_bias_set
    from bitfit.lm_checkpoint import is_lm_model, load_lm_model

    if args.base:
        if args.bias_set:
            raise BitfitError("--base evaluates the backbone without a bias set; give --base or --bias-set, not both")
        return eval_generation(args)
    if not args.bias_set:
        raise BitfitError("give --bias-set FILE (or --base for the backbone zero-shot on a generation task)")
    if is_lm_model(args.bias_set):
        return eval_generation(args, checkpoint=load_lm_model(args.bias_set))
    # a bias set, or the checkpoint of a method that is not servable (full, lora, random)
    checkpoint = load_task_model(args.bias_set) if is_task_model(args.bias_set) else None
    bias_set = checkpoint or load_bias_set(args.bias_set)
    if getattr(bias_set, "is_generation", False):
        return eval_generation(args, bias_set=bias_set)
    data = load_data(args, task=bias_set.task)
    if list(data.spec.labels) != list(bias_set.labels):
        from bitfit.errors import DataError

        raise DataError(f"the data's labels {data.spec.labels} differ from the bias set's {bias_set.labels}")
    backbone = load_backbone_from(args)
    model = checkpoint.build(backbone) if checkpoint else task_model_from_bias_set(backbone, bias_set)
    from bitfit.data import subset

    dev = subset(data.dev, args.max_dev, 0)
    metrics = evaluate(model, backbone, data.spec, dev, progress=True)
    print(f"{bias_set.task} dev {data.spec.metric}={metrics[data.spec.metric]:.4f} ({format_metrics(metrics)}) "
          f"on {len(dev)} examples")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a task and write a bias set")
    add_data(p)
    add_backbone(p)
    p.add_argument("--task", required=True, help="task name stored in the bias set")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--method", default="bitfit", help="bitfit (default), head, full, and those `bitfit compare` lists")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the method's)")
    p.add_argument("--head-lr", type=float, help="peak learning rate of the task head (default: --lr)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train", type=int, help="train on a fixed random subset of this many examples")
    p.add_argument("--max-dev", type=int, help="evaluate on a fixed random subset of this many examples")
    p.add_argument("--pooling", choices=["mean", "cls", "pooler", "last"], help="default: mean (encoders), last (decoders)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="start from this bias set's biases and head (train further)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--objective", choices=["classify", "lm"], default="classify",
                   help="classify (default): a head on pooled states; lm: causal-LM loss on the reference tokens of an "
                   "E2E-format folder (--data with train.txt, valid.txt), written as a generation bias set")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule ends there)")
    add_prompt(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a bias set (or a checkpoint) on a task's dev split; BLEU for generation")
    p.add_argument("--bias-set", help="a bias set, or a checkpoint written by `bitfit train --method full|lora|random`")
    p.add_argument("--base", action="store_true", help="generation: the backbone alone, zero-shot (the floor)")
    add_data(p)
    add_backbone(p)
    p.add_argument("--max-dev", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("generation (a generation bias set, an lm checkpoint, or --base)")
    g.add_argument("--split", choices=["test", "dev"], help="which split to score (default: test)")
    g.add_argument("--beams", type=int, default=1, help="1 (default): greedy; N: beam search with N beams")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a finished hypothesis scores log-probability / length**this (default 1.0)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per input at most (default 64)")
    g.add_argument("--max-test", type=int, help="score a fixed random subset of this many inputs (seed 0)")
    g.add_argument("--batch-size", type=int, help="rows decoded together (default 64; a beam takes `beams` rows)")
    g.add_argument("--predictions", help="write the generated sentences here, one per line, in input order")
    g.add_argument("--json", help="write the scores and outputs here (JSON)")
    add_prompt(g)
    p.set_defaults(func=cmd_eval)

    for extra in EXTENSIONS:
        extra(sub)
    return parser


# Other layers register their subcommands here (serve and the admin client, compare), imported lazily.
EXTENSIONS: list = []


def _load_extensions() -> None:
    import importlib

    for name in ("bitfit_cli.serve", "bitfit_cli.compare", "bitfit_cli.llm"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        if module.add_commands not in EXTENSIONS:  # main() may run more than once in a process (tests)
            EXTENSIONS.append(module.add_commands)


def main(argv: list[str] | None = None) -> int:
    from bitfit.errors import BitfitError

    _load_extensions()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BitfitError as e:
        print(f"bitfit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values from the library (unknown method, pooling, ...)
        print(f"bitfit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
