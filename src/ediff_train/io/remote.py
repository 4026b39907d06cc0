"""Shard sets and prep outputs at a URL: s3://, gs://, http(s):// (any fsspec protocol) and
WebDataset's `pipe:` commands. Naming, retry with backoff, atomic uploads, and backend failures
turned into one line that says what to install or set.

Why fsspec: one maintained client per protocol (s3fs, gcsfs, aiohttp) that takes credentials
and endpoints from the backend's usual environment and files (AWS_*, ~/.aws,
GOOGLE_APPLICATION_CREDENTIALS, FSSPEC_<PROTOCOL>_<OPTION>); our configs never hold any.
Local and parallel-filesystem paths never come here: they keep the mapped reader (tario.py).

A `pipe:` root is a shell command with `{name}` where the file name goes, e.g.
`pipe:curl -sfL https://host/set/{name}`; it can be read, not listed or written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ediff_train.errors import EdiffError

log = logging.getLogger(__name__)
T = TypeVar("T")

PIPE = "pipe:"
NAME = "{name}"
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+)://")
_MANGLED = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]+):/(?!/)")  # str(Path("s3://b/x")) == "s3:/b/x"
_LOCAL = ("file", "local")
# package behind each scheme, and our extra that installs it
BACKENDS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "az": "adlfs",
    "abfs": "adlfs",
}
EXTRAS = {"gcsfs": "gcs"}
# errors that a retry cannot fix (matched by class name: the backends' own exception types)
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    EdiffError,
    ImportError,
    TypeError,
    KeyError,
)
_NO_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "DefaultCredentialsError",
    "RefreshError",
}
_PERMANENT_NAMES = _NO_CREDENTIALS | {
    "NoRegionError",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ParamValidationError",
}


# ----------------------------------------------------------------------------- names


def scheme(path: str | os.PathLike[str]) -> str | None:
    """'s3', 'https', 'pipe', ... or None for a local path."""
    text = os.fspath(path)
    if text.startswith(PIPE):
        return "pipe"
    match = _URL.match(text) or _MANGLED.match(text)
    return match.group(1).lower() if match and match.group(1).lower() not in _LOCAL else None


def is_remote(path: str | os.PathLike[str]) -> bool:
    return scheme(path) is not None


def normalize(path: str | os.PathLike[str]) -> str:
    """The URL as written, also when it went through Path() (which folds '//' to '/')."""
    text = os.fspath(path)
    if text.startswith(PIPE):
        return text
    return _MANGLED.sub(r"\1://", text, count=1)


def join(root: str | os.PathLike[str], name: str) -> str:
    """`root`/`name` for URLs ({name} filled in for pipe:), os.path.join for local paths."""
    if not is_remote(root):
        return os.path.join(os.fspath(root), name)
    url = normalize(root)
    if url.startswith(PIPE):
        if NAME not in url:
            raise EdiffError(
                f"a pipe: root needs {NAME} where the file name goes, e.g. "
                f"'pipe:curl -sfL https://host/set/{NAME}'; got {url!r}"
            )
        return url.replace(NAME, name)
    return url.rstrip("/") + "/" + name


def shard_name(url: str) -> str:
    """The shard's file name (NNNNNN.tar), also inside a pipe: command."""
    found = re.findall(r"[^/\s'\"]+\.tar\b", url) if url.startswith(PIPE) else []
    return found[-1] if found else os.path.basename(url.rstrip("/"))


# ----------------------------------------------------------------------------- backends


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it); EdiffError when the scheme's backend is missing."""
    import fsspec

    url = normalize(url)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        pkg = BACKENDS.get(scheme(url) or "", None)
        how = f"pip install {pkg}" if pkg else f"install the fsspec backend ({e})"
        if pkg in EXTRAS:
            how += f" (or pip install 'ediff-train[{EXTRAS[pkg]}]')"
        raise EdiffError(
            f"{url}: {scheme(url)}:// needs a backend that is not installed: {how}"
        ) from None
    except ValueError as e:
        raise EdiffError(
            f"{url}: no backend for {scheme(url)}:// ({e}); use a local path, "
            "s3://, gs://, http(s):// or a pipe: command"
        ) from None


def transient(e: BaseException) -> bool:
    """Whether trying again may help (connection drops, timeouts, 5xx, a failing pipe)."""
    if isinstance(e, _PERMANENT):
        return False
    return not any(c.__name__ in _PERMANENT_NAMES for c in type(e).__mro__)


def brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def describe(url: str, e: BaseException, tries: int = 1) -> EdiffError:
    """One line for a failed access to `url`, naming what to set."""
    names = {c.__name__ for c in type(e).__mro__}
    why, kind = brief(e), scheme(url)
    if names & _NO_CREDENTIALS:
        if kind in ("gs", "gcs"):
            fix = (
                "set GOOGLE_APPLICATION_CREDENTIALS to a key file or run `gcloud auth "
                "application-default login`; public buckets: FSSPEC_GCS_TOKEN=anon"
            )
        else:
            fix = (
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "(~/.aws/credentials); public buckets: FSSPEC_S3_ANON=true"
            )
        return EdiffError(f"no credentials for {url} ({why}): {fix}")
    if isinstance(e, PermissionError):
        return EdiffError(f"access to {url} denied ({why}): check the credentials' permissions")
    if isinstance(e, FileNotFoundError):
        return EdiffError(f"{url} does not exist ({why})")
    if isinstance(e, EdiffError):
        return e
    hint = " and the endpoint (AWS_ENDPOINT_URL)" if kind in ("s3", "s3a") else ""
    return EdiffError(
        f"cannot reach {url} after {tries} tr{'ies' if tries > 1 else 'y'} "
        f"({type(e).__name__}: {why}); check the network{hint}"
    )


@dataclass(frozen=True)
class Retry:
    """Tries per request, exponential backoff with jitter: delay, 2·delay, ... up to max_delay."""

    attempts: int = 5
    delay: float = 0.5
    max_delay: float = 8.0

    def wait(self, attempt: int) -> float:
        return min(self.max_delay, self.delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

    def call(self, fn: Callable[[], T], url: str) -> T:
        """fn(), tried again on transient errors; the last error propagates unchanged."""
        for attempt in range(1, max(1, self.attempts) + 1):
            try:
                return fn()
            except Exception as e:
                if attempt >= self.attempts or not transient(e):
                    raise
                wait = self.wait(attempt)
                log.warning(
                    "%s: %s; try %d of %d in %.1f s",
                    url,
                    brief(e),
                    attempt + 1,
                    self.attempts,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")


RETRY = Retry()


def _read(url: str) -> bytes:
    if url.startswith(PIPE):
        import webdataset as wds

        with wds.gopen(url, "rb") as stream:  # closing raises on a non-zero exit status
            return stream.read()
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_bytes(url: str, retry: Retry = RETRY) -> bytes:
    """The whole object; backend errors propagate (after retries) for the caller to judge."""
    return retry.call(lambda: _read(url), url)


def read_text(url: str, retry: Retry = RETRY, missing_ok: bool = True) -> str | None:
    """The object as text; when it does not exist None (or FileNotFoundError, `missing_ok`
    False); other failures: one-line EdiffError."""
    if not url.startswith(PIPE):
        filesystem(url)  # a missing backend: say so, not "cannot reach"
    try:
        return read_bytes(url, retry).decode("utf-8")
    except FileNotFoundError:
        if not missing_ok:
            raise
        return None
    except Exception as e:
        raise describe(url, e, retry.attempts if transient(e) else 1) from None


def listing(root: str, retry: Retry = RETRY) -> dict[str, int] | None:
    """{name: size} of the files directly under `root`; None where the backend cannot list:
    pipe:, and HTTP (an index page, where there is one, is no reliable listing)."""
    if root.startswith(PIPE):
        return None
    fs, path = filesystem(root)
    if "http" in protocols(fs):
        return None
    try:
        entries = retry.call(lambda: fs.ls(path, detail=True, refresh=True), root)
    except FileNotFoundError:
        return {}
    except Exception as e:
        raise describe(root, e, retry.attempts if transient(e) else 1) from None
    return {
        e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def writable(url: str) -> tuple[Any, str]:
    """(filesystem, path) of an output URL; pipe: and HTTP cannot be written to."""
    if url.startswith(PIPE) or scheme(url) in ("http", "https"):
        raise EdiffError(
            f"output {url}: {scheme(url)} locations are read-only; write to a "
            "local folder, s3:// or gs://"
        )
    return filesystem(url)


def upload(
    url: str,
    data: bytes | None = None,
    local: str | os.PathLike[str] | None = None,
    retry: Retry = RETRY,
) -> None:
    """Put `data` (or the file `local`) at `url`, complete or not at all: uploaded under a
    temporary name beside it, then moved into place."""
    fs, path = writable(url)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"

    def put() -> None:
        if local is not None:
            fs.put_file(os.fspath(local), tmp)
        else:
            fs.pipe_file(tmp, data)
        fs.mv(tmp, path)

    try:
        retry.call(put, url)
    except Exception as e:
        raise describe(url, e, retry.attempts if transient(e) else 1) from None


def remove(url: str, retry: Retry = RETRY) -> None:
    fs, path = writable(url)
    try:
        retry.call(lambda: fs.rm_file(path), url)
    except FileNotFoundError:
        pass


def local_copy(url: str, marker: str, retry: Retry = RETRY) -> Path:
    """A local copy of the folder `url` (e.g. saved encoders), cached under $EDIFF_CACHE by URL
    and the contents of its `marker` file, so a changed folder is fetched again."""
    url = normalize(url).rstrip("/")
    if url.startswith(PIPE):
        raise EdiffError(
            f"{url} is a pipe: command, which cannot fetch a folder; copy it "
            "locally and point at the copy"
        )
    text = read_text(join(url, marker), retry)
    if text is None:
        raise EdiffError(f"{join(url, marker)} does not exist")
    base = Path(os.environ.get("EDIFF_CACHE") or Path.home() / ".cache" / "ediff_train")
    target = base / "remote" / hashlib.sha256(f"{url}\n{text}".encode()).hexdigest()[:20]
    if (target / marker).is_file():
        return target
    fs, path = filesystem(url)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
    try:
        retry.call(lambda: fs.get(path.rstrip("/") + "/", str(tmp), recursive=True), url)
        if not target.exists():  # else another process fetched it first
            os.replace(tmp, target)
    except Exception as e:
        raise describe(url, e, retry.attempts) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
