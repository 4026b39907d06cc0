"""Where data_prep writes: a local folder or an object-store URL (s3://, gs://), behind one
interface so the prep job's "complete or absent" rules (prep.py) hold on both.

Local: files are written under a temporary name and renamed (atomic on POSIX file systems);
job.json is created with a hard link (create-if-absent), the encoders folder by a rename.
Remote: shards are written into a local staging folder and uploaded under a temporary name,
then moved into place (remote.upload); a unit's part marker goes up only after its shard, so a
killed job resumes exactly. An object store has no create-if-absent here: job.json is written
when missing and read back, so of two tasks racing with different settings one stops.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ediff_train.errors import EdiffError
from ediff_train.io.remote import (
    describe,
    is_remote,
    join,
    listing,
    normalize,
    read_text,
    remove,
    upload,
    writable,
)


class LocalStore:
    """A folder on this machine (or a parallel file system); shards are written in place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.staging = self.root

    def place(self, name: str) -> Path:
        return self.root / name

    def check(self) -> None:
        """Fail early (before encoders load) when the output cannot be used."""

    def prepare(self, *folders: str) -> None:
        for folder in ("", *folders):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def read_many(self, names: list[str]) -> list[str | None]:
        return [self.read_text(n) for n in names]

    def write_text(self, name: str, text: str) -> None:
        path = self.root / name
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        tmp.write_text(text)
        os.replace(tmp, path)

    def create_text(self, name: str, text: str) -> None:
        """Write `name` unless it exists; racing processes agree on one file."""
        path = self.root / name
        if path.is_file():
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}")
        tmp.write_text(text)
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system: last writer wins
            os.replace(tmp, path)
        tmp.unlink(missing_ok=True)

    def names(self, folder: str = "") -> dict[str, int]:
        """{file name: size} directly under `folder`."""
        base = self.root / folder
        if not base.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in base.iterdir() if p.is_file()}

    def clean(self, name: str) -> None:
        """Drop temporaries of `name` left by a killed run."""
        for stale in self.root.glob(f".{name}.tmp*"):
            stale.unlink(missing_ok=True)

    def publish(self, name: str) -> None:
        """A staged shard is already in place here."""

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def put_dir(self, local: Path, name: str) -> None:
        """Move the folder `local` to `name` unless another task did first."""
        try:
            os.rename(local, self.root / name)
        except OSError:
            shutil.rmtree(local, ignore_errors=True)


class RemoteStore:
    """An object-store prefix; see the module doc for what keeps it complete-or-absent."""

    def __init__(self, url: str) -> None:
        self.root = normalize(url).rstrip("/")
        self.fs, self.path = writable(self.root)
        self._tmp = tempfile.TemporaryDirectory(prefix="ediff-prep-")  # removed when dropped
        self.staging = Path(self._tmp.name)

    def place(self, name: str) -> str:
        return join(self.root, name)

    def check(self) -> None:
        """The bucket exists and the credentials can list it: one request, before any work."""
        bucket = self.path.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise EdiffError(
                f"output {self.root}: bucket {bucket} does not exist (or is not "
                "visible with these credentials); create it first"
            ) from None
        except Exception as e:
            raise describe(self.root, e) from None
        listing(self.root)

    def prepare(self, *folders: str) -> None:
        """Object stores have no folders."""

    def read_text(self, name: str) -> str | None:
        return read_text(self.place(name))

    def read_many(self, names: list[str]) -> list[str | None]:
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(self.read_text, names))

    def write_text(self, name: str, text: str) -> None:
        upload(self.place(name), text.encode("utf-8"))

    def create_text(self, name: str, text: str) -> None:
        if self.read_text(name) is None:
            self.write_text(name, text)

    def names(self, folder: str = "") -> dict[str, int]:
        return listing(join(self.root, folder) if folder else self.root) or {}

    def clean(self, name: str) -> None:
        for stale in self.staging.glob(f".{name}.tmp*"):
            stale.unlink(missing_ok=True)
        for stale in self.fs.glob(f"{self.path}/.{name}.tmp*"):
            remove(f"{self.root}/{stale.rsplit('/', 1)[-1]}")

    def publish(self, name: str) -> None:
        """Upload the staged shard (temporary name, then moved), then drop the local copy."""
        local = self.staging / name
        upload(self.place(name), local=local)
        local.unlink()

    def remove(self, name: str) -> None:
        remove(self.place(name))

    def put_dir(self, local: Path, name: str) -> None:
        """Upload every file of `local`; its top-level *.json last (the marker readers check)."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.parent == local and p.suffix == ".json")
        for path in files:
            upload(self.place(f"{name}/{path.relative_to(local).as_posix()}"), local=path)
        shutil.rmtree(local, ignore_errors=True)


Store = LocalStore | RemoteStore


def open_store(output: str | os.PathLike[str]) -> Store:
    return RemoteStore(os.fspath(output)) if is_remote(output) else LocalStore(output)


def load_json(text: str | None, where: str) -> dict:
    """A JSON object read from a store; one-line error when it is not one."""
    try:
        obj = json.loads(text or "")
    except ValueError as e:
        raise EdiffError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise EdiffError(f"{where} is not a JSON object")
    return obj
