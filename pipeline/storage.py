"""Where runs and datasets live: a folder on this machine or on an object store (`s3://`,
`gs://`, `abfs://`), through one abstraction, `pyarrow.fs`, the one Ray Train itself writes
checkpoints with. Object stores are reached with their SDK's standard settings
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION for S3).

    runs = Location("s3://bucket/runs")     # or Location("runs"): a local folder, made absolute
    (runs / "quickstart" / "run_id.txt").write_text("...")
    [child.name for child in runs.children()]
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")


class StorageError(OSError):
    """A location that cannot be reached, read or written, with what to do about it."""


def is_remote(where: str | Path) -> bool:
    """Whether `where` names an object store (a URI with a scheme other than file://)."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


class Location:
    """A file or folder, local or on an object store. Folders on object stores are prefixes:
    they exist while something is under them."""

    _listed: pafs.FileInfo | None = None  # what a listing said of it (`children`), so `size` asks nothing

    def __init__(self, where: str | Path | Location):
        if isinstance(where, Location):
            self.fs, self.path, self.scheme = where.fs, where.path, where.scheme
            return
        text = str(where)
        if is_remote(text):
            self.scheme = text.split("://", 1)[0]
            try:
                self.fs, self.path = pafs.FileSystem.from_uri(text.rstrip("/"))
            except (OSError, ValueError) as e:
                raise StorageError(f"cannot use {text}: {e}") from e
        else:
            self.scheme = ""
            self.fs = pafs.LocalFileSystem()
            self.path = str(Path(text.removeprefix("file://")).expanduser().resolve())

    @property
    def uri(self) -> str:
        """How users, Ray Train and DALI name it: a plain path when local."""
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    def local_path(self) -> Path:
        if self.remote:
            raise StorageError(f"{self.uri} is on an object store, not on this machine's disk")
        return Path(self.path)

    def __truediv__(self, name: str) -> Location:
        child = Location(self)
        child.path = f"{self.path.rstrip('/')}/{name}"
        return child

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: Location) -> bool:
        return self.uri < other.uri

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise StorageError(f"cannot reach {self.uri}: {e}") from e

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int | None:
        """The file's size in bytes; None for a folder or nothing."""
        return (self._listed or self._info()).size

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def children(self) -> list[Location]:
        """What is directly in this folder (nothing when it does not exist), in name order."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        try:
            found = self.fs.get_file_info(selector)
        except OSError as e:
            raise StorageError(f"cannot list {self.uri}: {e}") from e
        children = []
        for info in found:
            child = self / info.base_name
            child._listed = info
            children.append(child)
        return sorted(children)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.uri} does not exist") from e

    def open(self) -> pafs.NativeFile:
        """The file as a stream to read from (a context manager)."""
        return self.fs.open_input_stream(self.path)

    def read_range(self, offset: int, size: int) -> bytes:
        with self.fs.open_input_file(self.path) as f:
            return f.read_at(size, offset)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Writes the whole file at once: a local file through a temporary beside it and a rename,
        an object with one upload, so that a reader never sees half of it."""
        if not self.remote:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(f"{self.path}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            tmp.replace(self.path)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Removes the file, or the folder and everything under it."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload_file(self, path: Path) -> None:
        """Copies the local file `path` here, streamed (a shard need not fit in memory)."""
        pafs.copy_files(str(path.resolve()), self.path, pafs.LocalFileSystem(), self.fs)

    def upload(self, folder: Path) -> None:
        """Copies the local `folder`'s files to this location, in parallel."""
        pafs.copy_files(str(folder.resolve()), self.path, pafs.LocalFileSystem(), self.fs, use_threads=True)

    def download(self, folder: Path) -> None:
        """Copies what is under this location into the local `folder`, in parallel."""
        folder.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(folder.resolve()), self.fs, pafs.LocalFileSystem(), use_threads=True)

    def check_writable(self) -> None:
        """Writes and removes a small file here.

        Raises:
            StorageError: naming the location and what the store said.
        """
        probe = self / f".resnet-pipe-write-check-{uuid.uuid4().hex[:12]}"
        try:
            probe.write_text("resnet-pipe checks that it can write here\n")
            probe.delete()
        except OSError as e:
            hint = (
                "check the bucket's name and the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                "AWS_ENDPOINT_URL for a store other than AWS)"
                if self.remote
                else "check the path and its permissions"
            )
            raise StorageError(f"cannot write to {self.uri}: {str(e).splitlines()[0]}; {hint}") from e


def patiently(action: Callable[[], T], what: str, give_up_s: float, say: Callable[[str], None]) -> T:
    """`action()`, tried again while it fails with OSError (a store that refuses, drops the
    connection or times out), after 1 s, then twice as long each time up to 30 s, for up to
    `give_up_s`. An outage is told in two lines whatever its retries: when it starts, and when
    the store answers again.

    Raises:
        StorageError: the store failed for `give_up_s`; one line, naming `what` and the last error.
    """
    first_failure, wait_s = None, 1.0
    while True:
        try:
            done = action()
        except OSError as e:
            # pyarrow's S3 errors say "AWS Error NETWORK_CONNECTION ..." on their first line
            said = (str(e).strip().splitlines() or [type(e).__name__])[0].replace("AWS Error ", "")
            now = time.monotonic()
            if first_failure is None:
                first_failure = now
                say(f"warning: the object store did not take {what} ({said}); retrying for {give_up_s:.0f} s")
            elif now - first_failure + wait_s > give_up_s:
                raise StorageError(
                    f"the object store did not take {what} for {now - first_failure:.0f} s ({said}): "
                    "the run stops, its last whole checkpoint kept (run.storage_outage_s sets the wait)"
                ) from None
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, 30.0)
            continue
        if first_failure is not None:
            outage_s = time.monotonic() - first_failure
            say(f"the object store answers again after {outage_s:.0f} s: {what} stored")
        return done
