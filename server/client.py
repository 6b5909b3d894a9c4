"""A small httpx client for a running bitfit server: predictions and the admin API, as a Python library.

    from server.client import BitfitClient
    with BitfitClient("http://127.0.0.1:8000", token="...") as c:
        c.push("sst2", "sst2.safetensors")
        c.predict("sst2", ["a fine film"])

Every error answer becomes a `ClientError` carrying the status and the server's `detail`.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from bitfit.errors import BitfitError

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(BitfitError):
    def __init__(self, status: int | None, detail: str):
        self.status, self.detail = status, detail
        super().__init__(f"{status} {detail}" if status is not None else detail)


class BitfitClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0):
        self.url = (url or os.environ.get("BITFIT_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("BITFIT_ADMIN_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> "BitfitClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ClientError(None, f"cannot reach {self.url} ({e}); is `bitfit serve` running there?") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail", body.get("error", response.text))  # {"error"} under /v2
            except ValueError:
                detail = response.text
            raise ClientError(response.status_code, str(detail))
        return response.json()

    # -- serving -----------------------------------------------------------------------------------------

    def predict(self, task: str, inputs: list, version: str | None = None) -> dict:
        params = {"task": task} | ({"version": version} if version else {})
        return self._call("POST", "/predict", params=params, json={"inputs": inputs})

    def fanout(self, tasks: list[str], inputs: list) -> list[dict]:
        """Every task's answer to the same inputs, in one forward pass; one {"task", "version", "predictions"} per
        task, in order."""
        return self._call("POST", "/fanout", params=[("task", t) for t in tasks], json={"inputs": inputs})["results"]

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def ready(self) -> dict:
        return self._call("GET", "/readyz")

    # -- tasks -------------------------------------------------------------------------------------------

    def tasks(self) -> list[dict]:
        return self._call("GET", "/tasks")["tasks"]

    def task(self, task: str) -> dict:
        return self._call("GET", f"/tasks/{task}")

    def push(self, task: str, bias_set: bytes | str | os.PathLike, *, activate: bool = True) -> dict:
        """Upload a bias set (bytes or a file path); returns {"task", "version"}."""
        data = bias_set if isinstance(bias_set, bytes) else Path(bias_set).read_bytes()
        return self._call("PUT", f"/tasks/{task}", content=data, params={"activate": str(activate).lower()},
                          headers={"Content-Type": "application/octet-stream"})

    def activate(self, task: str, version: str) -> dict:
        return self._call("POST", f"/tasks/{task}/activate", json={"version": version})

    def rollback(self, task: str) -> dict:
        return self._call("POST", f"/tasks/{task}/rollback")

    def audit(self, task: str | None = None, *, limit: int = 100) -> list[dict]:
        """The audit log of admin changes, newest first (needs a token with scope read)."""
        params = {"limit": limit} | ({"task": task} if task else {})
        return self._call("GET", "/audit", params=params)["records"]

    def delete(self, task: str, version: str | None = None, *, force: bool = False) -> dict:
        if version is None:
            return self._call("DELETE", f"/tasks/{task}")
        return self._call("DELETE", f"/tasks/{task}/versions/{version}", params={"force": str(force).lower()})
