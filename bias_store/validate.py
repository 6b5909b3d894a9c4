"""Validation of an uploaded bias set against the running backbone's serving spec, before anything is written.

`validate` is pure: bytes in, a list of problems out (empty when the file is fine), each problem one
sentence that says what to fix. Nothing but safetensors is ever parsed, and the safetensors header is
parsed here first (8-byte little-endian length, a bounded JSON header whose dtypes, shapes and offsets
must tile the data section exactly), so a hostile header never reaches a full load. Values are checked
straight from the bytes with numpy; the safetensors library reads the file only once all else passed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_numpy

from bitfit.bias_set import (CLASSIFICATION, CLASSIFICATION_ONLY_KEYS, DELTA, FORMAT, FORMAT_VERSION, GENERATION,
                             GENERATION_KEYS, INPUT_KINDS, JSON_KEYS, KINDS, REQUIRED_KEYS, required_keys)
from bitfit.heads import POOLINGS
from bitfit.lm import stop_problems, template_problems
from bitfit.spec import ServingSpec, shape_problems
from bias_store.names import task_name_problem

MAX_HEADER_BYTES = 64 * 1024  # a real bias set's header is well under 4 KiB
MAX_META_VALUE = 8 * 1024  # characters per metadata value
MAX_LABELS = 1024
MAX_LABEL_LEN = 128
MAX_RANK = 8

WEIGHT, BIAS = "head.out.weight", "head.out.bias"
EXPECTED_TENSORS = (DELTA, WEIGHT, BIAS)
OPTIONAL_KEYS = ("metrics", "train_args", "injected", "created_at", "input_kind")
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS + ("kind",)  # a classification set may say kind "classification"
# a generation set: the delta alone (the backbone's LM head writes), no labels or pooling, a template and stops
TENSORS_OF_KIND = {CLASSIFICATION: EXPECTED_TENSORS, GENERATION: (DELTA,)}
KNOWN_KEYS_OF_KIND = {
    CLASSIFICATION: KNOWN_KEYS,
    GENERATION: required_keys(GENERATION) + tuple(k for k in OPTIONAL_KEYS if k not in CLASSIFICATION_ONLY_KEYS),
}
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets inside the data section
    end: int


@dataclass(frozen=True)
class Header:
    meta: dict[str, str] | None  # None: the file has no __metadata__
    tensors: dict[str, TensorEntry]
    data_start: int  # 8 + header length


def validate(data: bytes, spec: ServingSpec | None, *, max_bytes: int, task: str | None = None) -> list[str]:
    """Every reason `data` is not a bias set servable under `spec` (stored under `task`); empty when it is one.

    The backbone checks (fingerprint, delta size, head width, pooler) are `spec.problems`, the very check
    the server's bank runs before loading; `spec` None skips them, for offline tools.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return [f"a bias set must be bytes, got {type(data).__name__}"]
    data = bytes(data)
    if len(data) > max_bytes:
        return [f"file is {len(data):,} bytes, over the limit of {max_bytes:,} bytes"]
    header, problems = parse_header(data)
    if header is None:
        return problems
    meta_problems, n_out = check_metadata(header.meta, task)
    problems += check_tensors(header.tensors, (header.meta or {}).get("kind", CLASSIFICATION))
    shapes = {k: t.shape for k, t in header.tensors.items()}
    if spec is not None:  # the sizes the backbone sets, and what else it decides, in the bank's own check
        problems += spec.problems(header.meta or {}, shapes)
    else:
        problems += shape_problems(shapes, n_out)
        pooling = (header.meta or {}).get("pooling")
        if pooling is not None and pooling not in POOLINGS:
            problems.append(f"unknown pooling {pooling[:32]!r}; choose one of {', '.join(POOLINGS)}")
    problems += meta_problems
    if not problems:
        problems += check_values(data, header)
    if not problems:
        try:  # the library's own parser must agree with ours before anyone loads the file
            st_load_numpy(data)
        except (SafetensorError, ValueError, OSError) as e:
            problems.append(f"safetensors cannot read the file: {e}")
    return problems


def parse_header(data: bytes) -> tuple[Header | None, list[str]]:
    """The safetensors header, checked against the file size; (None, problems) when it cannot be used."""
    if len(data) < 8:
        return None, [f"file is {len(data)} bytes, too short for safetensors (which starts with an 8-byte header length)"]
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        foreign = foreign_format(data)
        if foreign:
            return None, [foreign]
        if n > MAX_HEADER_BYTES:
            return None, [f"safetensors header claims {n:,} bytes, over the limit of {MAX_HEADER_BYTES:,}"]
        return None, [f"file is truncated or not safetensors: the header claims {n:,} bytes but only {len(data) - 8:,} follow"]
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        return None, [f"safetensors header is not UTF-8 ({e.reason} at byte {e.start})"]
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        return None, [f"safetensors header is not valid JSON: {e}"]
    if not isinstance(header, dict):
        return None, [f"safetensors header must be a JSON object, got {type(header).__name__}"]

    problems: list[str] = []
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        problems.append("safetensors __metadata__ must map strings to strings")
        meta = None
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        parsed = _tensor_entry(name, entry)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            tensors[name] = parsed
    if problems:
        return None, problems
    data_len = len(data) - 8 - n
    problems += _check_tiling(tensors, data_len)
    if problems:
        return None, problems
    return Header(meta, tensors, 8 + n), []


def foreign_format(data: bytes) -> str | None:
    """A specific message for common non-safetensors files (which are never deserialised)."""
    if data[:4] == b"PK\x03\x04":
        return "file is a zip archive (torch.save / .pt / .bin), not safetensors; only safetensors bias sets are accepted"
    if data[:1] == b"\x80" and 2 <= data[1] <= 5:
        return "file is a Python pickle, not safetensors; pickles can run code and are never loaded"
    if data[:1] in (b"{", b"["):
        return "file is JSON text, not safetensors"
    return None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise ValueError(f"duplicate keys {dupes}")
    return dict(pairs)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_entry(name: str, entry: object) -> TensorEntry | str:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return f"header entry {name!r} must be an object with exactly dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        return f"tensor {name!r} has unknown dtype {dtype!r}"
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(_is_int(d) and d >= 0 for d in shape)):
        return f"tensor {name!r} has a malformed shape {shape!r} (want a list of at most {MAX_RANK} non-negative ints)"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        return f"tensor {name!r} has malformed data_offsets {offsets!r} (want [begin, end])"
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if not 0 <= begin <= end or end - begin != nbytes:
        return f"tensor {name!r}: data_offsets {offsets} do not hold {dtype} {shape} ({nbytes:,} bytes)"
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_tiling(tensors: dict[str, TensorEntry], data_len: int) -> list[str]:
    """Tensors must cover the data section exactly, in order, without gaps or overlaps."""
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            how = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
            return [f"tensor {name!r} starts at byte {t.begin:,} of the data section and {how}"]
        pos = t.end
    if pos > data_len:
        return [f"file is truncated: the header describes {pos:,} bytes of tensor data, the file holds {data_len:,}"]
    if pos < data_len:
        return [f"file has {data_len - pos:,} bytes after the last tensor; the data section must end with it"]
    return []


def check_tensors(tensors: dict[str, TensorEntry], kind: str = CLASSIFICATION) -> list[str]:
    """Names and dtypes: exactly delta, head.out.weight and head.out.bias (a generation set: delta alone), all
    float32 (shapes: `shape_problems`). An unknown kind is checked as a classification set (`check_metadata`
    reports the kind)."""
    problems = []
    wanted = TENSORS_OF_KIND.get(kind, EXPECTED_TENSORS)
    expected = ", ".join(wanted)
    what = ("a generation bias set holds only delta (it has no classification head)" if kind == GENERATION
            else f"a bias set holds exactly {expected}")
    for name in wanted:
        if name not in tensors:
            problems.append(f"missing tensor {name!r}; {what}")
    for name in sorted(set(tensors) - set(wanted)):
        problems.append(f"unexpected tensor {name!r}; {what}")
    for name in wanted:
        if name in tensors and tensors[name].dtype != "F32":
            dtype = tensors[name].dtype
            problems.append(f"tensor {name!r} is {DTYPE_NAMES.get(dtype, dtype)}, expected float32")

    return problems


def check_metadata(meta: dict[str, str] | None, task: str | None) -> tuple[list[str], int | None]:
    """Problems with the metadata, and the number of head outputs its labels imply (None if unknown)."""
    if meta is None:
        return [f"file has no metadata; a bias set needs {', '.join(REQUIRED_KEYS)}"], None
    problems = []
    kind = meta.get("kind", CLASSIFICATION)
    if kind not in KINDS:
        problems.append(f"metadata kind {kind[:32]!r} is not one of {', '.join(KINDS)}")
        kind = CLASSIFICATION
    known = KNOWN_KEYS_OF_KIND[kind]
    for k in sorted(set(meta) - set(known)):
        if kind == GENERATION and k in CLASSIFICATION_ONLY_KEYS:
            problems.append(f"metadata {k!r} belongs to a classification head, and a generation bias set has none; "
                            "drop it")
        else:
            problems.append(f"unknown metadata key {k[:64]!r}; allowed keys are {', '.join(known)}")
    for k in required_keys(kind):
        if k not in meta:
            problems.append(f"metadata lacks {k!r}" + (" (a generation bias set needs kind, prompt_template and stop)"
                                                        if k in GENERATION_KEYS else ""))
    for k, v in meta.items():
        if len(v) > MAX_META_VALUE:
            problems.append(f"metadata {k[:64]!r} is {len(v):,} characters, over the limit of {MAX_META_VALUE:,}")
    ok = {k: v for k, v in meta.items() if k in known and len(v) <= MAX_META_VALUE}
    if "prompt_template" in ok:
        problems += [f"metadata prompt_template: {p}" for p in template_problems(ok["prompt_template"])]
    if "stop" in ok:
        try:
            problems += [f"metadata stop: {p}" for p in stop_problems(json.loads(ok["stop"]))]
        except (json.JSONDecodeError, RecursionError) as e:
            problems.append(f"metadata 'stop' is not valid JSON: {str(e)[:120]}")

    if "format" in ok and ok["format"] != FORMAT:
        problems.append(f"metadata format is {ok['format'][:64]!r}, expected {FORMAT!r}")
    if "format_version" in ok and ok["format_version"] != FORMAT_VERSION:
        problems.append(f"format_version {ok['format_version'][:16]!r} is not supported (want {FORMAT_VERSION!r})")
    if "task" in ok:
        name_problem = task_name_problem(ok["task"])
        if name_problem:
            problems.append(f"metadata task: {name_problem}")
        elif task is not None and ok["task"] != task:
            problems.append(
                f"metadata names task {ok['task']!r} but the file is being stored under {task!r}; "
                f"the file's task must match the task it is uploaded to (re-save it with task={task!r})"
            )
    if "input_kind" in ok and ok["input_kind"] not in INPUT_KINDS:
        problems.append(f"metadata input_kind {ok['input_kind'][:32]!r} is not one of {', '.join(INPUT_KINDS)}")
    if "method" in ok and not ok["method"].strip():
        problems.append("metadata method is empty")
    if "created_at" in ok and ok["created_at"]:
        try:
            datetime.fromisoformat(ok["created_at"])
        except ValueError:
            problems.append(f"metadata created_at {ok['created_at'][:40]!r} is not an ISO 8601 time")

    parsed = {}
    want = {"labels": list, "injected": list, "metrics": dict, "train_args": dict}
    for k in JSON_KEYS:
        if k not in ok:
            continue
        try:
            value = json.loads(ok[k])
        except (json.JSONDecodeError, RecursionError) as e:
            problems.append(f"metadata {k!r} is not valid JSON: {str(e)[:120]}")
            continue
        if not isinstance(value, want[k]):
            problems.append(f"metadata {k!r} must be a JSON {want[k].__name__}, got {type(value).__name__}")
            continue
        parsed[k] = value
    if "injected" in parsed and not all(isinstance(p, str) for p in parsed["injected"]):
        problems.append("metadata 'injected' must be a list of module paths (strings)")
    n_out = None
    if "labels" in parsed:
        label_problems = check_labels(parsed["labels"])
        problems += label_problems
        if not label_problems:
            n_out = len(parsed["labels"]) or 1
    return problems, n_out


def check_labels(labels: list) -> list[str]:
    if len(labels) > MAX_LABELS:
        return [f"{len(labels):,} labels, over the limit of {MAX_LABELS:,}"]
    if len(labels) == 1:
        return ["a classifier needs at least 2 labels (an empty list means regression)"]
    problems = []
    if not all(isinstance(x, str) for x in labels):
        return ["labels must be strings"]
    if any(not x.strip() for x in labels):
        problems.append("labels must be non-empty strings")
    if any(len(x) > MAX_LABEL_LEN for x in labels):
        problems.append(f"a label is longer than {MAX_LABEL_LEN} characters")
    dupes = sorted(x for x, c in Counter(labels).items() if c > 1)
    if dupes:
        problems.append(f"labels must be unique; repeated: {dupes[:5]}")
    return problems


def check_values(data: bytes, header: Header) -> list[str]:
    """Finite float32 values, read straight from the bytes (only called once names and dtypes are right)."""
    problems = []
    for name in EXPECTED_TENSORS:
        if name not in header.tensors:  # a generation set has no head
            continue
        t = header.tensors[name]
        values = np.frombuffer(data, dtype="<f4", count=(t.end - t.begin) // 4, offset=header.data_start + t.begin)
        n_nan, n_inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if n_nan or n_inf:
            problems.append(f"tensor {name!r} has {n_nan} NaN and {n_inf} infinite values; all values must be finite")
    return problems
