"""Server settings: one pydantic-settings class; every field can be set as BITFIT_<NAME> in the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SEED_DIR = Path(__file__).resolve().parent / "seed"


BACKENDS = ("torch", "onnxruntime")
QUANTIZE = ("none", "int8")


def backend_problems(s) -> list[str]:
    """Options that the chosen backend cannot honour: refused, never ignored."""
    problems = []
    if s.backend not in BACKENDS:
        return [f"backend {s.backend!r} is not one of {', '.join(BACKENDS)}"]
    if s.quantize not in QUANTIZE:
        problems.append(f"quantize {s.quantize!r} is not one of {', '.join(QUANTIZE)}")
    if s.backend == "onnxruntime":
        if s.device != "cpu":
            problems.append(f"backend onnxruntime runs on the CPU only; use --backend torch for --device {s.device}")
        if s.dtype != "float32":
            problems.append(f"backend onnxruntime runs float32 graphs (or --quantize int8), not {s.dtype}")
        if s.compile:
            problems.append("compile is a torch backend option; backend onnxruntime has its own graph optimiser")
    else:
        if s.quantize == "int8":
            problems.append("quantize int8 needs --backend onnxruntime")
        if s.ort_threads is not None:
            problems.append("ort_threads is an onnxruntime option; the torch backend uses threads")
    return problems


class Settings(BaseSettings):
    # hide_input_in_errors: a bad setting must not print the admin token into the logs
    model_config = SettingsConfigDict(env_prefix="BITFIT_", env_ignore_empty=True, extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = 8000
    store: str = Field("store", description="bias store: a directory (created if missing) or s3://BUCKET/PREFIX "
                       "(endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... or a profile)")
    backbone: Path | None = Field(None, description="local HF model directory; default: the packaged all-MiniLM-L6-v2")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: str = Field("float32", description="float32; bfloat16 or float16 on a GPU")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")
    backend: str = Field("torch", description="the engine that runs the backbone: torch, or onnxruntime (CPU, "
                         "float32; the backbone exported once and cached, docs/onnx.md)")
    runner: str = Field("process", pattern="^(process|thread)$",
                        description="where the engine runs: its own process (its Python never waits on the HTTP "
                                    "server's interpreter lock; docs/engine.md) or a thread of the server's")
    quantize: str = Field("none", description="onnxruntime: none, or int8 (dynamic int8 weights; opt-in: "
                          "its accuracy is measured in docs/onnx.md)")
    ort_threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: threads, "
                                    "else one per core)")
    onnx_cache: Path | None = Field(None, description="where exported graphs are cached (default: "
                                    "$BITFIT_CACHE_DIR/onnx, else ~/.cache/bitfit-serve/onnx)")
    compile: bool = Field(False, description="run the backbone under torch.compile (same outputs; measure first)")
    admin_token: SecretStr | None = Field(None, description="bearer token for the admin API; unset = admin refused")
    tokens_file: Path | None = Field(None, description="JSON list of {name, sha256, scopes}: scoped bearer tokens, "
                                     "re-read when the file changes (docs/platform.md)")
    tokens_reload_s: float = Field(1.0, gt=0, description="how often the tokens file is checked for changes")
    predict_auth: bool = Field(False, description="/predict, /fanout and V2 inference need a token with scope predict")
    read_auth: bool | None = Field(None, description="GET /tasks and V2 model metadata need a token with scope read; "
                                   "default: on when a tokens file is set")
    seed: bool = Field(True, description="at start, store the shipped bias sets of tasks the store lacks")
    seed_dir: Path = SEED_DIR

    max_batch: int = Field(32, ge=1, description="inputs per forward pass")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward pass (inputs x the longest)")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a request waits for others to fill a batch")
    max_queued: int = Field(1024, ge=1, description="inputs waiting at most; beyond, 503 with Retry-After")
    group_max_tasks: int = Field(1, ge=1, description="batches of up to this many tasks run one forward per task")
    retry_after_s: int = Field(1, ge=1)
    max_inputs: int = Field(64, ge=1, description="inputs per /predict request")
    max_text_chars: int = Field(20_000, ge=1, description="characters per text; longer is refused (422)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body limit except uploads (413)")
    max_upload_bytes: int = Field(16 << 20, ge=1024, description="bias set upload limit (413)")
    max_inactive: int = Field(16, ge=0, description="non-active versions kept resident for ?version= requests")
    poll_interval_s: float = Field(0.25, gt=0, description="how often to look for changes made by other processes")
    # uvicorn arms its keep-alive timer late when the next request on a connection arrives before the last
    # response is marked complete, and then closes that connection mid-request once the timer fires (uvicorn
    # issues #824, #1637); its 5 s default is shorter than a request queued under backpressure
    fast_predict: bool = Field(True, description="answer well-formed POST /predict requests without FastAPI's "
                               "routing (same answers, less CPU per request; docs/engine.md)")
    keep_alive_s: float = Field(75.0, gt=0, description="seconds an idle keep-alive connection stays open")
    # generation (/v1/completions, /v1/chat/completions; a backbone that generates, docs/generation.md)
    max_tokens: int = Field(256, ge=1, description="new tokens per generation request at most (400 beyond)")
    generation_slots: int = Field(16, ge=1, description="sequences decoding together; more wait to join")
    generation_max_queued: int = Field(256, ge=1, description="generation requests waiting to join at most; "
                                       "beyond, 503 with Retry-After")

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_text(cls, value):
        return str(value) if isinstance(value, Path) else value  # a Path is a directory; s3:// arrives as text

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        problems = []
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.dtype == "float16" and not self.device.startswith("cuda"):
            problems.append("dtype float16 needs a GPU (--device cuda); use float32 on the CPU")
        problems += backend_problems(self)
        if self.max_inputs > self.max_queued:
            problems.append(f"max_inputs ({self.max_inputs}) exceeds max_queued ({self.max_queued}): "
                            "such a request could never be admitted")
        if self.predict_auth and self.tokens_file is None:
            problems.append("predict_auth needs a tokens file (BITFIT_TOKENS_FILE) holding tokens with scope predict")
        if self.read_auth and self.tokens_file is None and self.token() is None:
            problems.append("read_auth needs tokens: BITFIT_TOKENS_FILE (scope read) or BITFIT_ADMIN_TOKEN")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def reads_need_token(self) -> bool:
        return self.read_auth if self.read_auth is not None else self.tokens_file is not None

    def token(self) -> str | None:
        value = self.admin_token.get_secret_value() if self.admin_token is not None else ""
        return value or None
