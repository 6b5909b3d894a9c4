"""Helpers for tests and checks of the server: the real MiniLM once per process, random bias sets of the right
shape, the reference "each task alone" outputs, and a real uvicorn server on a free loopback port.
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch

from bitfit.backbone import Backbone, load_backbone
from bitfit.bias_set import BiasSet
from bitfit.evaluate import task_model_from_bias_set
from server.runtime.engine import TorchEngine
from server.runtime.inputs import Item


@lru_cache(maxsize=1)
def minilm() -> Backbone:
    """The packaged all-MiniLM-L6-v2, loaded once per process; callers must leave its biases as they found them."""
    return load_backbone()


def fresh_engine(backbone: Backbone | None = None, **kw) -> TorchEngine:
    """An engine on a private copy of the backbone (the engine rewires and casts the model it is given)."""
    backbone = backbone or minilm()
    backbone.reset_biases()
    return TorchEngine(copy.deepcopy(backbone), **kw)


def random_bias_set(
    backbone: Backbone,
    task: str,
    labels: Sequence[str] = ("negative", "positive"),
    *,
    pooling: str = "mean",
    seed: int = 0,
    scale: float = 0.3,
    head_seed: int | None = None,
    input_kind: str | None = None,
) -> BiasSet:
    """A bias set of the right shape whose deltas are large enough to change the outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    h = torch.Generator().manual_seed(seed if head_seed is None else head_seed)
    n = max(len(labels), 1)
    hidden = backbone.hidden_size
    return BiasSet(
        task=task,
        delta=torch.randn(backbone.layout.size, generator=g) * scale,
        head={"out.weight": torch.randn(n, hidden, generator=h) * 0.5, "out.bias": torch.randn(n, generator=h)},
        labels=list(labels),
        fingerprint=backbone.layout.fingerprint,
        pooling=pooling,
        input_kind=input_kind,
    )


@torch.no_grad()
def alone(backbone: Backbone, bias_set: BiasSet, items: Sequence[Item]) -> list[torch.Tensor]:
    """Each input run by itself through the plain model with the task's biases written in: the reference."""
    model = task_model_from_bias_set(backbone, bias_set)
    outs = []
    try:
        for x in items:
            enc = backbone.encode([x]) if isinstance(x, str) else backbone.encode([x[0]], [x[1]])
            outs.append(model(**enc)[0].float())
    finally:
        backbone.reset_biases()
    return outs


@contextmanager
def serve(app, *, timeout: float = 120.0) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a thread, on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = getattr(app.state, "settings", None)
    keep_alive = settings.keep_alive_s if settings is not None else 75.0
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=keep_alive))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
