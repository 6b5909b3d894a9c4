"""Prometheus metrics, in a registry of their own per app (tests run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNKNOWN_TASK = "_unknown"  # label for requests naming no known task: keeps label values bounded


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bitfit_requests", "/predict requests", ["task"], registry=r)
        self.errors = Counter("bitfit_request_errors", "/predict requests answered with an error", ["task", "status"],
                              registry=r)
        self.latency = Histogram("bitfit_request_latency_seconds", "/predict latency", ["task"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Histogram("bitfit_request_inputs", "inputs per /predict request", ["task"],
                                buckets=SIZE_BUCKETS, registry=r)
        self.batches = Counter("bitfit_batches", "forward passes by mode (swap, gather, group)", ["mode"], registry=r)
        self.batch_size = Histogram("bitfit_batch_size", "inputs per forward pass", ["mode"], buckets=SIZE_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("bitfit_queue_depth", "inputs waiting for the engine", registry=r)
        self.resident = Gauge("bitfit_resident_tasks", "task versions loaded on the device", registry=r)
        self.bank_bytes = Gauge("bitfit_bank_bytes", "device bytes held by the bias bank", registry=r)
        self.reloads = Counter("bitfit_store_reloads", "task versions loaded after a change in the store", registry=r)
        # per token: label values are the names in the tokens file, so they stay bounded
        self.token_requests = Counter("bitfit_token_requests", "requests let through, by token and scope",
                                      ["token", "scope"], registry=r)
        self.auth_refusals = Counter("bitfit_auth_refusals", "requests refused for their token (401, 403)",
                                     ["token", "status"], registry=r)
        self.tokens_errors = Counter("bitfit_tokens_file_errors", "re-reads of a malformed tokens file (old tokens kept)",
                                     registry=r)
        # generation (/v1): label values are task names, as for /predict; unknown models are counted by status only
        self.gen_requests = Counter("bitfit_generation_requests", "/v1 completions and chat completions that started",
                                    ["task"], registry=r)
        self.gen_errors = Counter("bitfit_generation_errors", "/v1 requests answered with an error", ["status"],
                                  registry=r)
        self.gen_prompt_tokens = Counter("bitfit_generation_prompt_tokens", "prompt tokens of started sequences",
                                         ["task"], registry=r)
        self.gen_completion_tokens = Counter("bitfit_generation_completion_tokens",
                                             "tokens generated (a disconnected client's count too)", ["task"], registry=r)
        self.gen_first_token = Histogram("bitfit_generation_first_token_seconds",
                                         "time from a request's start to its first generated text", ["task"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.gen_latency = Histogram("bitfit_generation_latency_seconds", "time from a request's start to its last token",
                                     ["task"], buckets=LATENCY_BUCKETS + (30.0, 60.0), registry=r)
        self.audit_errors = Counter("bitfit_audit_write_errors", "admin changes whose audit record could not be stored",
                                    registry=r)

    def batch(self, mode: str, size: int) -> None:
        self.batches.labels(mode).inc()
        self.batch_size.labels(mode).observe(size)

    def request(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task).inc()
        self.latency.labels(task).observe(seconds)
        if status >= 400:
            self.errors.labels(task, str(status)).inc()

    def generated(self, task: str, prompt_tokens: int, completion_tokens: int, first_s: float | None,
                  total_s: float) -> None:
        self.gen_requests.labels(task).inc()
        self.gen_prompt_tokens.labels(task).inc(prompt_tokens)
        self.gen_completion_tokens.labels(task).inc(completion_tokens)
        if first_s is not None:
            self.gen_first_token.labels(task).observe(first_s)
        self.gen_latency.labels(task).observe(total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
