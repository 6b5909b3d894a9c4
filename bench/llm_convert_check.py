"""Check that the cached conversion of a GGUF file is the GGUF model: same fingerprint, same token ids,
bit-identical last hidden states. Loads the GGUF directly (slow: about 80 s for SmolLM2-135M).

    .venv/bin/python bench/llm_convert_check.py [GGUF|smollm2]
"""

from __future__ import annotations

import sys
import time

import torch

from bitfit import llm
from bitfit.backbone import finish_backbone, load_backbone

TEXTS = ["a gripping, beautifully acted film", "dull.", "héllo wörld — 123 <|im_end|> tokens!"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = argv[0] if argv else "smollm2"
    gguf = llm.packaged_gguf(source) if source in llm.ALIASES else source
    t = time.perf_counter()
    direct = finish_backbone(*llm.load_gguf(gguf), str(gguf))
    t_direct = time.perf_counter() - t
    t = time.perf_counter()
    converted = load_backbone(gguf)
    t_converted = time.perf_counter() - t
    a, b = direct.encode(TEXTS), converted.encode(TEXTS)
    same_ids = torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with torch.no_grad():
        same_hidden = torch.equal(direct.model(**a).last_hidden_state, converted.model(**b).last_hidden_state)
    same_print = direct.layout.fingerprint == converted.layout.fingerprint
    print(f"load from GGUF {t_direct:.0f} s, from the converted directory {t_converted:.0f} s ({converted.source})")
    print(f"same fingerprint: {same_print}; same token ids: {same_ids}; bit-identical hidden states: {same_hidden}")
    return 0 if same_print and same_ids and same_hidden else 1


if __name__ == "__main__":
    sys.exit(main())
