"""Server settings: one pydantic-settings class; every field can be set as BITFIT_<NAME> in the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SEED_DIR = Path(__file__).resolve().parent / "seed"


class Settings(BaseSettings):
    # hide_input_in_errors: a bad setting must not print the admin token into the logs
    model_config = SettingsConfigDict(env_prefix="BITFIT_", env_ignore_empty=True, extra="ignore", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = 8000
    store: Path = Field(Path("store"), description="bias store directory (created if missing)")
    backbone: Path | None = Field(None, description="local HF model directory; default: the packaged all-MiniLM-L6-v2")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: str = Field("float32", description="float32; bfloat16 or float16 on a GPU")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")
    admin_token: SecretStr | None = Field(None, description="bearer token for the admin API; unset = admin refused")
    seed: bool = Field(True, description="at start, store the shipped bias sets of tasks the store lacks")
    seed_dir: Path = SEED_DIR

    max_batch: int = Field(32, ge=1, description="inputs per forward pass")
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

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        problems = []
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {self.dtype!r} is not one of float32, bfloat16, float16")
        if self.dtype == "float16" and not self.device.startswith("cuda"):
            problems.append("dtype float16 needs a GPU (--device cuda); use float32 on the CPU")
        if self.max_inputs > self.max_queued:
            problems.append(f"max_inputs ({self.max_inputs}) exceeds max_queued ({self.max_queued}): "
                            "such a request could never be admitted")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def token(self) -> str | None:
        value = self.admin_token.get_secret_value() if self.admin_token is not None else ""
        return value or None
