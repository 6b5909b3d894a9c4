"""BitFit: fine-tune only a transformer's bias terms (plus a small task head).

The package knows nothing about HTTP or storage: it finds bias slots in any Hugging Face model
(`layout`), injects zero biases where a model has none (`inject`), trains and evaluates task heads
(`train`, `evaluate`) and reads and writes the `BiasSet` artifact (`bias_set`). For `transformers` users:
`apply_bitfit(model)`, then `save_bias_set(model, path, task=...)` and `load_bias_set_into(model, path)`.
"""

from importlib import import_module

# Loaded on first use, so that `bitfit push` and other client commands start without importing torch.
_WHERE = {
    "BiasSet": "bias_set", "load_bias_set": "bias_set", "save_bias_set": "bias_set",
    "BackboneMismatch": "errors", "BiasSetFormatError": "errors", "BitfitError": "errors", "DataError": "errors",
    "apply_bitfit": "inject", "count_trainable": "inject", "inject_biases": "inject",
    "bias_set_from_model": "hf_model", "load_bias_set_into": "hf_model", "UnservableHead": "hf_head",
    "BiasLayout": "layout", "BiasSlot": "layout", "find_slots": "layout", "layout_of": "layout",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"bitfit.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'bitfit' has no attribute {name!r}")
