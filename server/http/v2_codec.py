"""Bodies of V2 inference: the JSON form and the binary tensor data extension (tritonclient's default), both ways.

Binary form: the JSON header comes first, its length in the `Inference-Header-Content-Length` header; each tensor
with `parameters.binary_data_size` follows it, in order. A BYTES tensor's elements are each a 4-byte
little-endian length and the bytes; FP32 is little-endian float32, row-major.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.errors import InvalidInput, RequestTooLarge
from server.http.schemas_v2 import BYTES, FP32, InferRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
WBITS = {"gzip": 31, "deflate": 15}  # zlib's window bits for a gzip member, and for a zlib stream ("deflate")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A request body sent with Content-Encoding gzip or deflate (tritonclient's request compression), unpacked
    to at most `limit` bytes."""
    if not encoding or encoding == "identity":
        return body
    wbits = WBITS.get(encoding.strip().lower())
    if wbits is None:
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInput(f"the body is not valid {encoding} data: {e}") from None
    if len(out) > limit:
        raise RequestTooLarge(None, limit)
    return out


def split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data after it)."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length!r}: it must be the JSON header's length in bytes, "
                           f"at most the body's {len(body)}")
    n = int(header_length)
    return body[:n], body[n:]


def decode_bytes_tensor(blob: bytes, name: str) -> list[str]:
    out, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            raise InvalidInput(f"input {name!r}: binary data end inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", blob, i)
        i += 4
        if i + size > len(blob):
            raise InvalidInput(f"input {name!r}: element {len(out)} claims {size} bytes, {len(blob) - i} are left")
        try:
            out.append(blob[i : i + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name!r}: element {len(out)} is not UTF-8 text") from None
        i += size
    return out


def decode_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, list[str]]]:
    """The request and each input's texts, checked against each other (shape, sizes, names): 422 otherwise."""
    head, rest = split(body, header_length)
    try:
        request = InferRequest.model_validate_json(head)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None
    tensors: dict[str, list[str]] = {}
    problems, offset = [], 0
    for t in request.inputs:
        size = t.parameters.binary_data_size if t.parameters else None
        if t.name in tensors:
            problems.append(f"input {t.name!r} is given twice")
            continue
        if t.parameters is not None and "shared_memory_region" in (t.parameters.model_extra or {}):
            problems.append(f"input {t.name!r}: shared memory is not supported; send the texts in the request")
            continue
        if len(t.shape) == 2 and t.shape[1] != 1:
            problems.append(f"input {t.name!r} has shape {t.shape}: one text per row, shape [n] or [n, 1]")
            continue
        if size is not None and t.data is not None:
            problems.append(f"input {t.name!r} has both data and binary_data_size: send one")
            continue
        if size is not None:
            blob, offset = rest[offset : offset + size], offset + size
            if len(blob) < size:
                problems.append(f"input {t.name!r} claims {size} bytes of binary data; the body has {len(blob)} left")
                continue
            values = decode_bytes_tensor(blob, t.name)
        elif t.data is None:
            problems.append(f"input {t.name!r} has no data: send 'data' or binary data with binary_data_size")
            continue
        else:
            values = [x for row in t.data for x in ([row] if isinstance(row, str) else row)]
        if len(values) != t.shape[0]:
            problems.append(f"input {t.name!r} has shape {t.shape} but {len(values)} elements")
        tensors[t.name] = values
    if not problems and offset != len(rest):
        problems.append(f"{len(rest) - offset} bytes after the JSON header belong to no input")
    if problems:
        raise InvalidInput("; ".join(problems))
    return request, tensors


def output_problem(request: InferRequest, task: str, labels: tuple[str, ...]) -> str | None:
    """Why the outputs asked for are not the task's, or None."""
    have = ("label", "scores") if labels else ("value",)
    for o in request.outputs or []:
        if o.name not in have:
            return f"model {task!r} has no output {o.name!r}; its outputs are {', '.join(have)}"
        extra = (o.parameters.model_extra or {}) if o.parameters is not None else {}
        if "classification" in extra:
            return "the classification extension is not supported: ask for 'label' and 'scores'"
        if "shared_memory_region" in extra:
            return f"output {o.name!r}: shared memory is not supported; outputs come in the response"
    return None


def encode_response(request: InferRequest, task: str, answer: dict) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type) of a V2 answer built from a /predict answer (`PredictResponse`'s shape)."""
    predictions = answer["predictions"]
    n = len(predictions)
    if "label" in predictions[0]:
        labels = list(predictions[0]["scores"])  # the task's label order (the scores dict is built in it)
        tensors = {"label": (BYTES, [n], [p["label"] for p in predictions]),
                   "scores": (FP32, [n, len(labels)], [p["scores"][lab] for p in predictions for lab in labels])}
    else:
        tensors = {"value": (FP32, [n], [p["value"] for p in predictions])}
    default = bool(request.parameters and request.parameters.binary_data_output)
    wanted = request.outputs or []
    asked = [(o.name, o.parameters.binary_data if o.parameters and o.parameters.binary_data is not None else default)
             for o in wanted] or [(name, default) for name in tensors]
    outputs, blobs = [], []
    for name, binary in asked:
        datatype, shape, data = tensors[name]
        out = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = encode_binary(datatype, data)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = data
        outputs.append(out)
    body = {"model_name": task, "model_version": answer["version"]}
    if request.id is not None:
        body["id"] = request.id
    body["outputs"] = outputs
    head = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return head, {}, "application/json"
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}, "application/octet-stream"


def encode_binary(datatype: str, data: list) -> bytes:
    if datatype == BYTES:
        return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in data))
    return np.asarray(data, dtype="<f4").tobytes()
