"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) in their canonical python release, read into arrays.

`data prepare ROOT` finds, in ROOT, one of:

    cifar-10-python.tar.gz    or its folder cifar-10-batches-py/  (data_batch_1..5, test_batch, batches.meta)
    cifar-100-python.tar.gz   or its folder cifar-100-python/     (train, test, meta: the 100 fine labels)

Each batch is a pickled dict: `data` (N x 3072 uint8: the red, green and blue planes of 32 x 32,
each row-major), the labels and the file names. The pickles are read with an unpickler that
builds only dicts, lists, strings and numpy arrays: a file that asks for anything else is
refused, not run.

    release = find_release(root)            # None when ROOT holds no CIFAR release
    images, labels, names = release.read("train")   # N x 32 x 32 x 3 uint8, N labels, N file names
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIZE_PX = 32


@dataclass(frozen=True)
class Flavour:
    archive: str  # the canonical file name
    folder: str  # the folder the archive extracts to
    batches: dict[str, tuple[str, ...]]  # split ("train", "val": CIFAR's test set) -> member files
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR10 = Flavour(
    "cifar-10-python.tar.gz",
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)},
    "batches.meta",
    b"labels",
    b"label_names",
)
CIFAR100 = Flavour(
    "cifar-100-python.tar.gz",
    "cifar-100-python",
    {"train": ("train",), "val": ("test",)},
    "meta",
    b"fine_labels",
    b"fine_label_names",
)


class CifarError(ValueError):
    """A CIFAR release that cannot be read, with what is wrong."""


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's batches and nothing else: numpy arrays, and the builtins pickle makes
    without asking. Any other class a pickle names is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes from Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise CifarError(f"the pickle asks for {module}.{name}; a CIFAR batch holds only arrays and lists")


def _unpickle(data: bytes) -> dict:
    return _ArraysOnly(io.BytesIO(data), encoding="bytes").load()  # the batches were pickled by Python 2


@dataclass(frozen=True)
class Release:
    """A CIFAR release found under a dataset root: an archive or its extracted folder."""

    flavour: Flavour
    path: Path  # the archive, or the extracted folder

    @property
    def sources(self) -> list[Path]:
        """The files it is read from (what the manifest lists)."""
        if self.path.is_file():
            return [self.path]
        members = [m for split in self.flavour.batches.values() for m in split] + [self.flavour.meta]
        return [self.path / m for m in members]

    def _members(self) -> dict[str, bytes]:
        wanted = {m for split in self.flavour.batches.values() for m in split} | {self.flavour.meta}
        if self.path.is_dir():
            missing = sorted(m for m in wanted if not (self.path / m).is_file())
            if missing:
                raise CifarError(
                    f"{self.path} lacks {', '.join(missing)}; extract the whole {self.flavour.archive}"
                )
            return {m: (self.path / m).read_bytes() for m in wanted}
        found = {}
        try:
            with tarfile.open(self.path) as archive:
                for member in archive:
                    name = Path(member.name).name
                    if (
                        member.isfile()
                        and name in wanted
                        and Path(member.name).parent.name == self.flavour.folder
                    ):
                        found[name] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CifarError(f"{self.path} is not a readable tar.gz ({e}); download it again") from None
        missing = sorted(wanted - set(found))
        if missing:
            raise CifarError(
                f"{self.path} lacks {self.flavour.folder}/{', '.join(missing)}; download it again"
            )
        return found

    def read(self) -> tuple[list[str], dict[str, tuple[np.ndarray, list[int], list[str]]]]:
        """The class names (label order), and per split the images (N x 32 x 32 x 3 uint8, RGB),
        labels and file names.

        Raises:
            CifarError: a member is missing, unreadable, or not shaped like CIFAR's.
        """
        members = self._members()
        try:
            meta = _unpickle(members[self.flavour.meta])
            classes = [name.decode() for name in meta[self.flavour.names_key]]
            splits = {}
            for split, names in self.flavour.batches.items():
                batches = [_unpickle(members[name]) for name in names]
                data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
                if data.ndim != 2 or data.shape[1] != 3 * SIZE_PX * SIZE_PX:
                    raise CifarError(f"{split} data has shape {data.shape}, not N x 3072")
                images = data.reshape(-1, 3, SIZE_PX, SIZE_PX).transpose(0, 2, 3, 1)  # planes -> HWC
                labels = [int(x) for b in batches for x in b[self.flavour.label_key]]
                files = [f.decode() for b in batches for f in b[b"filenames"]]
                if not len(labels) == len(files) == len(images):
                    raise CifarError(
                        f"{split}: {len(images)} images, {len(labels)} labels, {len(files)} names"
                    )
                if labels and not 0 <= min(labels) <= max(labels) < len(classes):
                    raise CifarError(f"{split} has labels outside 0..{len(classes) - 1}")
                splits[split] = (np.ascontiguousarray(images), labels, files)
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, CifarError):
                raise
            raise CifarError(f"{self.path}: not a CIFAR python batch ({type(e).__name__}: {e})") from None
        return classes, splits


def find_release(root: Path) -> Release | None:
    """The CIFAR-10 or CIFAR-100 python release in `root` (archive or extracted), or None."""
    for flavour in (CIFAR10, CIFAR100):
        for path in (root / flavour.archive, root / flavour.folder):
            if path.exists():
                return Release(flavour, path)
    return None
