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


class PatientHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem (`pafs.PyFileSystem(PatientHandler(fs, ...))`) that does what `fs`
    does, each call tried again while the store fails (`patiently`). A file written through it is
    spooled to a local temporary file and uploaded whole when closed, so that a failed upload is
    retried from its first byte. Ray Train is given one for an object store
    (`RunConfig.storage_filesystem`): its controller writes its checkpoint records and its workers
    their checkpoints through it, and an outage shorter than `give_up_s` costs neither."""

    def __init__(self, fs: pafs.FileSystem, give_up_s: float, logger: str = "resnet_pipe"):
        self.fs, self.give_up_s, self.logger = fs, give_up_s, logger

    def __reduce__(self):  # Ray sends the filesystem to its controller and workers
        return PatientHandler, (self.fs, self.give_up_s, self.logger)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientHandler) and other.fs.equals(self.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def _patiently(self, what: str, action: Callable[[], T]) -> T:
        import logging

        where = f"{self.fs.type_name}://{what}"
        return patiently(action, where, self.give_up_s, logging.getLogger(self.logger).warning)

    def get_type_name(self) -> str:
        return f"patient+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._patiently(", ".join(paths), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._patiently(selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._patiently(path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._patiently(path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._patiently(path, lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise StorageError("refusing to delete everything in the store's root")

    def delete_file(self, path: str) -> None:
        self._patiently(path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._patiently(src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._patiently(src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str):
        return self._patiently(path, lambda: self.fs.open_input_stream(path))

    def open_input_file(self, path: str):
        return self._patiently(path, lambda: self.fs.open_input_file(path))

    def open_output_stream(self, path: str, metadata):
        import pyarrow as pa

        return pa.PythonFile(_SpooledUpload(self, path), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise StorageError(f"{path}: an object store does not append")

    def upload(self, local: Path, path: str) -> None:
        self._patiently(path, lambda: pafs.copy_files(str(local), path, pafs.LocalFileSystem(), self.fs))


class _SpooledUpload:
    """A file object that writes to a local temporary file and uploads it whole on close."""

    def __init__(self, handler: PatientHandler, path: str):
        import tempfile

        self.handler, self.path = handler, path
        self.spool = tempfile.NamedTemporaryFile(prefix="resnet-pipe-upload-", delete=False)
        self.closed = False

    def write(self, data) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        self.spool.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.spool.close()
        try:
            self.handler.upload(Path(self.spool.name), self.path)
        finally:
            Path(self.spool.name).unlink(missing_ok=True)


def patient_filesystem(location: Location, give_up_s: float) -> pafs.FileSystem | None:
    """The filesystem of an object store `location`, made patient (`PatientHandler`); None for a
    local folder, which needs none."""
    return pafs.PyFileSystem(PatientHandler(location.fs, give_up_s)) if location.remote else None
