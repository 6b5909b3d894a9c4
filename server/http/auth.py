"""Bearer tokens with scopes, read from a file that is re-read when it changes (no FastAPI here; deps.py uses it).

The file (`BITFIT_TOKENS_FILE`) is a JSON list of `{"name", "sha256", "scopes"}`: a token is kept only as the
SHA-256 of its secret, and a presented token is hashed and compared with every entry in constant time. Scopes:

- `predict`: /predict, /fanout and V2 inference, when `BITFIT_PREDICT_AUTH=true`;
- `read`: the GET endpoints that show tasks (when reads need a token) and `/audit` (always);
- `admin:<glob>`: upload, activate, roll back and delete tasks whose names match the glob (`admin:teama-*`,
  `admin:*`); every admin scope also reads.

`BITFIT_ADMIN_TOKEN` is one more token, named `BITFIT_ADMIN_TOKEN`, with scope `admin:*`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

log = logging.getLogger(__name__)

LEGACY_NAME = "BITFIT_ADMIN_TOKEN"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", re.ASCII)  # also a metric label value
GLOB_RE = re.compile(r"[a-z0-9_*?\[\]!-]{1,64}", re.ASCII)  # task-name characters and fnmatch's wildcards
SHA_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
FIELDS = {"name", "sha256", "scopes"}


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes  # sha256 of the secret
    scopes: frozenset[str]

    def allows(self, scope: str, task: str | None = None) -> bool:
        """`scope` is predict, read or admin (admin needs the task the call changes)."""
        globs = [s[len("admin:"):] for s in self.scopes if s.startswith("admin:")]
        if scope == "admin":
            return task is not None and any(fnmatchcase(task, g) for g in globs)
        if scope == "read":
            return "read" in self.scopes or bool(globs)
        return scope in self.scopes


def hash_secret(secret: str) -> str:
    """What the tokens file stores for a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def scope_problem(scope: object) -> str | None:
    if not isinstance(scope, str):
        return f"a scope must be a string, got {type(scope).__name__}"
    if scope in ("predict", "read"):
        return None
    if scope.startswith("admin:"):
        glob = scope[len("admin:"):]
        if GLOB_RE.fullmatch(glob):
            return None
        return (f"scope {scope!r}: the glob after 'admin:' must be 1-64 of a-z 0-9 _ - and the wildcards * ? [ ] ! "
                "(e.g. admin:teama-* or admin:*)")
    return f"unknown scope {scope!r}; scopes are predict, read, admin:<glob>, admin:*"


def token_problems(data: object) -> list[str]:
    """Everything wrong with a parsed tokens file; empty when it is fine."""
    if not isinstance(data, list):
        return [f"the file must hold a JSON list of {{\"name\", \"sha256\", \"scopes\"}} objects, "
                f"not a JSON {type(data).__name__}"]
    problems, names, digests = [], set(), set()
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object with name, sha256 and scopes")
            continue
        name = entry.get("name")
        if isinstance(name, str) and NAME_RE.fullmatch(name):
            where = f"entry {i} ({name!r})"
        missing, unknown = FIELDS - set(entry), set(entry) - FIELDS
        if missing:
            problems.append(f"{where}: missing {', '.join(sorted(missing))}")
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; fields are name, sha256, scopes")
        if "name" in entry:
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                problems.append(f"{where}: name must be 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit")
            elif name == LEGACY_NAME:
                problems.append(f"{where}: the name {LEGACY_NAME} is reserved for the token of that variable")
            elif name in names:
                problems.append(f"{where}: the name {name!r} is used twice")
            names.add(name)
        if "sha256" in entry:
            sha = entry["sha256"]
            if not isinstance(sha, str) or not SHA_RE.fullmatch(sha.lower()):
                problems.append(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the secret, not the secret)")
            elif sha.lower() in digests:
                problems.append(f"{where}: the same sha256 appears twice")
            else:
                digests.add(sha.lower())
        if "scopes" in entry:
            scopes = entry["scopes"]
            if not isinstance(scopes, list) or not scopes:
                problems.append(f"{where}: scopes must be a non-empty list, e.g. [\"predict\", \"read\"]")
            else:
                problems.extend(f"{where}: {p}" for s in scopes if (p := scope_problem(s)))
    return problems


def parse_tokens(text: str, source: str = "the tokens file") -> list[Token]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenFileError(f"{source} is not JSON: {e}") from None
    problems = token_problems(data)
    if problems:
        raise TokenFileError(f"{source}: " + "; ".join(problems))
    return [Token(e["name"], bytes.fromhex(e["sha256"]), frozenset(e["scopes"])) for e in data]


def read_tokens(path: Path) -> list[Token]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TokenFileError(f"cannot read the tokens file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TokenFileError(f"the tokens file {str(path)!r} is not UTF-8 text") from None
    return parse_tokens(text, f"the tokens file {str(path)!r}")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino  # an atomic rename changes the inode, an edit the mtime


class TokenRegistry:
    """The tokens in force: the file's (re-read at most every `reload_s` when it changed) plus the legacy one.

    A malformed file at start raises `TokenFileError`; a malformed (or vanished) file later keeps the tokens
    already in force and calls `on_error` once per bad version of the file (to revoke every token, write `[]`).
    """

    def __init__(self, path: Path | None, admin_token: str | None = None, *, reload_s: float = 1.0,
                 on_error: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.path, self.reload_s, self.on_error, self.clock = path, reload_s, on_error, clock
        self._legacy = [Token(LEGACY_NAME, hashlib.sha256(admin_token.encode()).digest(), frozenset({"admin:*"}))
                        ] if admin_token else []
        self._file: list[Token] = []
        self._seen: tuple[int, int, int] | None = None
        if path is not None:
            self._seen = _signature(path)
            self._file = read_tokens(path)
        self._checked = clock()

    @property
    def configured(self) -> bool:
        """Whether any token can exist (a file, even an empty one, or BITFIT_ADMIN_TOKEN)."""
        return self.path is not None or bool(self._legacy)

    def tokens(self) -> list[Token]:
        self._maybe_reload()
        return self._file + self._legacy

    def find(self, secret: str) -> Token | None:
        """The token whose secret this is; every entry is compared, in constant time, whatever matches."""
        digest = hashlib.sha256(secret.encode()).digest()
        found = None
        for token in self.tokens():
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def _maybe_reload(self) -> None:
        if self.path is None or self.clock() - self._checked < self.reload_s:
            return
        self._checked = self.clock()
        signature = _signature(self.path)
        if signature == self._seen:
            return
        self._seen = signature
        try:
            tokens = read_tokens(self.path)
        except TokenFileError as e:
            message = f"{e}; the {len(self._file)} tokens read before stay in force"
            log.error("%s", message)
            if self.on_error is not None:
                self.on_error(message)
            return
        log.info("tokens file %s re-read: %d tokens", self.path, len(tokens))
        self._file = tokens
