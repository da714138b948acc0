"""Data for the labs: MNIST from checksummed IDX files, and photographs.

Mirrors ``keras.datasets.mnist.load_data``: ``(x_train, y_train), (x_test, y_test)``
as uint8 arrays. Every file is verified by the SHA-256 of its *decompressed*
bytes before a single pixel is used, so a corrupted, truncated or swapped file
is an error that names the file, never a silently wrong data set.

Shapes: N images of H x W = 28 x 28 pixels; photographs are (H, W, 3) float32.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "find_data_dir",
    "load_mnist",
    "read_idx",
    "load_image",
    "save_image",
    "atomic_write",
    "check_output_path",
    "fsync_dir",
    "is_temporary",
    "remove_stale_temporaries",
    "MNIST_SHIPPED",
    "MNIST_FULL",
]


class DataError(ValueError):
    """A data file is missing, corrupted or not what it claims to be."""


# SHA-256 of the decompressed IDX bytes of the files shipped in data/mnist
# (the official MNIST test set; MD5s 2646ac64... and 27ae3e4e... as published).
MNIST_SHIPPED = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The four canonical downloads and the MD5 of each .gz as published with the data set.
MNIST_FULL = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

OFFLINE_SPLIT_SEED = 20190425
OFFLINE_TEST_SIZE = 2000

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def atomic_write(path, write) -> None:
    """Create ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is then renamed.

    The temporary file is flushed to disk (``fsync``) before the rename, and the
    folder after it, so a crash or a power cut leaves either the old file or the
    new one, never half of one. The temporary's name carries the writer's process
    id (``<name>.tmp<pid>-<random><suffix>``), so that
    :func:`remove_stale_temporaries` can delete what a killed writer left; the next
    write of the same file does so. The file gets the usual permissions (0666 less
    the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp{os.getpid()}-", suffix=path.suffix)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def check_output_path(path, extensions, argument="path") -> Path:
    """Check, before the work that produces it, that ``path`` can be written; returns it as a Path.

    The checks: a file name, not a folder; an extension among ``extensions``; a folder that exists (or can be
    created below an existing one, never through ``..`` after a missing folder, so the file lands where it was
    asked); and a real trial write there (a one-byte temporary named as :func:`atomic_write`'s, removed at
    once), which catches read-only folders, ``/proc`` and a full disk, where permission bits alone do not.

    Parameters
    ----------
    path : str or Path
        The output file.
    extensions : sequence of str
        The accepted suffixes, lower case with their dot (``(".json",)``); compared case-insensitively.
    argument : str
        How the user gave ``path`` (``"--out"``, ``"HOROVOD_TIMELINE"``), to name it in the error.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        Naming ``argument``, the value, what is wrong and what was expected.
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    shown = repr(text) if text is not None else repr(path)
    expected = f"a writable file path ending in {' or '.join(extensions)}"

    def fail(why):
        raise ValueError(f"{argument}={shown}: {why}; expected {expected}")

    if not text or not text.strip() or "\0" in text:
        fail("not a file name")
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        fail("is a folder")
    if out.suffix.lower() not in tuple(e.lower() for e in extensions):
        fail(f"the extension {out.suffix or '(none)'!r} is not one this output can have")
    if (out.exists() or out.is_symlink()) and not out.is_file():
        fail("exists and is not a regular file")
    folder = out.parent
    if not folder.exists():
        if ".." in out.parts:
            fail(f"the folder {folder} does not exist ('..' after a missing folder would put the file elsewhere)")
        while not folder.exists():
            folder = folder.parent
    if not folder.is_dir():
        fail(f"{folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f"{out.name}.tmp{os.getpid()}-", suffix=out.suffix)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        fail(f"cannot write in the folder {folder} ({exc.strerror or exc})")
    return out


def _fsync(path, flags=os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """Flush a folder's entries (a rename, a new or deleted file) to disk; a no-op where folders cannot be opened."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals renames itself
        return
    _fsync(folder)


_TEMPORARY = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)-[A-Za-z0-9_]+(?P<suffix>\.[^.]*)?$")


def is_temporary(path) -> bool:
    """True if ``path`` is named as :func:`atomic_write` names its temporary files (a write not yet renamed)."""
    return _TEMPORARY.match(Path(path).name) is not None


def remove_stale_temporaries(folder, name_prefix="") -> list:
    """Delete the temporary files that :func:`atomic_write` left in ``folder`` when its writer was killed.

    Only temporaries whose writing process no longer runs on this machine are
    deleted (a live writer's file is left alone).

    Parameters
    ----------
    folder : str or Path
        Where to look (not recursively).
    name_prefix : str
        Only temporaries of files whose name starts with this (``"model.ckpt"``) are considered.

    Returns
    -------
    list of Path
        The files deleted.
    """
    removed = []
    for entry in Path(folder).glob(f"{glob.escape(name_prefix)}*.tmp*"):
        match = _TEMPORARY.match(entry.name)
        if match is None or not match["target"].startswith(name_prefix) or _process_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(entry)
    return removed


def _process_alive(pid) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would send a Ctrl-C, not a probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process; or a platform that cannot tell. Keep its file
        return True
    return True


def find_data_dir(path=None) -> Path:
    """The folder holding ``mnist/`` and ``images/``.

    Order: the ``path`` argument, the ``WORKSHOP_DATA`` environment variable, the
    ``data/`` folder of the source tree this package was installed from, ``./data``.
    """
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif os.environ.get("WORKSHOP_DATA"):
        candidates.append(Path(os.environ["WORKSHOP_DATA"]))
    else:
        candidates += [Path(__file__).resolve().parent.parent / "data", Path.cwd() / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"data directory not found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass data_dir=..., set WORKSHOP_DATA, or run from a clone of the course repository"
    )


def _cache_dir() -> Path:
    root = os.environ.get("WORKSHOP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "workshop_lib"
    )
    return Path(root) / "mnist"


def _read_bytes(path: Path) -> bytes:
    """Bytes of ``path``, decompressed if it is gzip (by magic number, not by name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc}); the file is corrupted or truncated") from None
    return raw


def read_idx(path, sha256=None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a numpy array.

    Parameters
    ----------
    path : str or Path
        The file. Gzip is recognised by its magic bytes.
    sha256 : str, optional
        Expected SHA-256 of the decompressed bytes; a mismatch raises.

    Raises
    ------
    DataError
        If the file is missing, not IDX, truncated, or fails its checksum.
    """
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(
                f"{path}: sha256 of the decompressed bytes is {digest}, expected {sha256}; "
                "the file is corrupted or not the original: restore it from the repository"
            )
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes) "
            f"but the file holds {len(data) - header} bytes; the file is truncated or corrupted"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DataError(f"{folder / (stem + '.gz')}: file not found")


def _stratified_split(labels: np.ndarray, test_size: int, seed: int):
    """Indices (train, test) with each class in the test part in proportion to its count."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    take = np.floor(exact).astype(int)
    # largest remainders get the leftover slots, so the test part has exactly test_size images
    leftover = test_size - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:leftover]] += 1
    train_idx, test_idx = [], []
    for cls, n_test in zip(classes, take):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _download(url: str, dest: Path, md5: str) -> None:
    with urllib.request.urlopen(url, timeout=30) as response:
        payload = response.read()
    digest = hashlib.md5(payload).hexdigest()
    if digest != md5:
        raise DataError(f"{url}: downloaded MD5 {digest} differs from the published {md5}")
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(payload))


def _load_full(cache: Path, mirrors) -> tuple:
    arrays = {}
    for name, md5 in MNIST_FULL.items():
        dest = cache / name
        if dest.exists() and hashlib.md5(dest.read_bytes()).hexdigest() == md5:
            pass
        else:
            errors = []
            for mirror in mirrors:
                try:
                    _download(mirror + name, dest, md5)
                    break
                except (urllib.error.URLError, OSError, DataError) as exc:
                    errors.append(f"{mirror}: {exc}")
            else:
                raise DataError(
                    f"could not download {name} (this machine looks offline: {'; '.join(errors)}). "
                    f"Copy the four canonical MNIST files ({', '.join(MNIST_FULL)}) into {cache}, "
                    "or use load_mnist(full=False) for the 10,000 images shipped with the course"
                )
        arrays[name] = read_idx(dest)
    return (
        (arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]),
        (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]),
    )


def load_mnist(data_dir=None, full=False, *, cache_dir=None, mirrors=MNIST_MIRRORS):
    """Load MNIST as ``(x_train, y_train), (x_test, y_test)``.

    By default (``full=False``) it works offline on the 10,000 images shipped in
    ``data/mnist`` (the official MNIST *test* set), split **8,000 for training and
    2,000 held out**, stratified by digit with a fixed seed, so every learner and
    CI get the same split. ``full=True`` gives the canonical 60,000 / 10,000 sets,
    downloaded once into a cache (``$WORKSHOP_CACHE`` or ``~/.cache/workshop_lib``)
    and checked against their published MD5s.

    Parameters
    ----------
    data_dir : str or Path, optional
        Folder containing ``mnist/``; see :func:`find_data_dir` for the default.
    full : bool
        Download and use the canonical 60k/10k files.

    Returns
    -------
    (x_train, y_train), (x_test, y_test)
        uint8 images of shape (N, 28, 28) and uint8 labels of shape (N,).

    Raises
    ------
    DataError
        A file is missing, corrupted or truncated (the message names it), or
        ``full=True`` on a machine that cannot download.

    Examples
    --------
    >>> (x_train, y_train), (x_test, y_test) = load_mnist()
    >>> x_train.shape, x_test.shape
    ((8000, 28, 28), (2000, 28, 28))
    """
    if full:
        return _load_full(Path(cache_dir) if cache_dir else _cache_dir(), mirrors)
    folder = find_data_dir(data_dir) / "mnist"
    images = read_idx(_find(folder, "t10k-images-idx3-ubyte"), MNIST_SHIPPED["t10k-images-idx3-ubyte"])
    labels = read_idx(_find(folder, "t10k-labels-idx1-ubyte"), MNIST_SHIPPED["t10k-labels-idx1-ubyte"])
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise DataError(f"{folder}: expected 10000 images of 28x28 and 10000 labels")
    train, test = _stratified_split(labels, OFFLINE_TEST_SIZE, OFFLINE_SPLIT_SEED)
    return (images[train], labels[train]), (images[test], labels[test])


def load_image(path) -> np.ndarray:
    """Load a photograph as float32 RGB in [0, 1], shape (H, W, 3).

    Grayscale is repeated on three channels; an alpha channel (RGBA, LA,
    palette with transparency) is composited over white; 16-bit and 32-bit
    integer images are scaled by their full range; the EXIF orientation tag is
    applied so the array is the picture as a viewer shows it.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None

    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float64) / 65535.0
    elif im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        arr = arr / (65535.0 if arr.max() <= 65535 else 2.0**31 - 1)
    elif im.mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float64), 0.0, 1.0)
    else:
        if im.mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        arr = np.asarray(im, dtype=np.float64) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] in (2, 4):  # colour + alpha: composite over white
        alpha = arr[:, :, -1:]
        arr = arr[:, :, :-1] * alpha + (1.0 - alpha)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.float32)


def save_image(path, array) -> None:
    """Save an (H, W, 3) or (H, W) image; float arrays in [0, 1] or uint8.

    The file is written atomically (temporary file, then rename); the format
    follows the extension.
    """
    from PIL import Image

    arr = np.asarray(array)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"array.shape={arr.shape} must be (H, W, 3) or (H, W)")
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError("array contains NaN or Inf; expected values in [0, 1]")
        out = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"array.dtype={arr.dtype}; expected a float array in [0, 1] or uint8")
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    atomic_write(path, lambda tmp: Image.fromarray(out).save(tmp, format=image_format))
