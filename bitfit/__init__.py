"""BitFit: fine-tune only a transformer's bias terms (plus a small task head).

The package knows nothing about HTTP or storage: it finds bias slots in any Hugging Face model
(`layout`), injects zero biases where a model has none (`inject`), trains and evaluates task heads
(`train`, `evaluate`) and reads and writes the `BiasSet` artifact (`bias_set`).
"""

from bitfit.bias_set import BiasSet, load_bias_set, save_bias_set
from bitfit.errors import BackboneMismatch, BiasSetFormatError, BitfitError, DataError
from bitfit.inject import apply_bitfit, inject_biases
from bitfit.layout import BiasLayout, BiasSlot, find_slots, layout_of

__all__ = [
    "BiasLayout",
    "BiasSet",
    "BiasSlot",
    "BackboneMismatch",
    "BiasSetFormatError",
    "BitfitError",
    "DataError",
    "apply_bitfit",
    "find_slots",
    "inject_biases",
    "layout_of",
    "load_bias_set",
    "save_bias_set",
]
