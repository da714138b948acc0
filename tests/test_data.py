import gzip
import hashlib
import http.server
import re
import shutil
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import free_port

from workshop_lib import data
from workshop_lib.data import DataError, load_image, load_mnist, read_idx, save_image


def test_offline_mnist_is_8000_train_2000_test_uint8():
    (x_train, y_train), (x_test, y_test) = load_mnist()
    assert x_train.shape == (8000, 28, 28) and y_train.shape == (8000,)
    assert x_test.shape == (2000, 28, 28) and y_test.shape == (2000,)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}


def test_offline_mnist_matches_the_published_statistics():
    (x_train, y_train), (x_test, y_test) = load_mnist()
    labels = np.concatenate([y_train, y_test])
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = np.concatenate([x_train, x_test]).mean() / 255
    assert abs(mean - 0.1325) < 5e-4


def test_offline_split_is_stratified_disjoint_and_deterministic(root):
    (x_train, y_train), (x_test, y_test) = load_mnist()
    counts = np.bincount(np.concatenate([y_train, y_test]))
    assert np.all(np.abs(np.bincount(y_test) - counts * 0.2) <= 1)
    # disjoint: no held-out image also sits in the training part (compare raw bytes)
    train_keys = {img.tobytes() for img in x_train}
    assert sum(img.tobytes() in train_keys for img in x_test) <= 2  # MNIST has a few exact duplicates at most
    (x_train2, _), (x_test2, _) = load_mnist(data_dir=root / "data")
    assert np.array_equal(x_train, x_train2) and np.array_equal(x_test, x_test2)


def _copy_mnist(root, tmp_path):
    shutil.copytree(root / "data" / "mnist", tmp_path / "mnist")
    return tmp_path


def test_one_flipped_byte_in_a_shipped_file_is_an_error_naming_the_file(root, tmp_path):
    folder = _copy_mnist(root, tmp_path)
    path = folder / "mnist" / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[5000] ^= 0x01
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*sha256"):
        load_mnist(data_dir=folder)


def test_flipped_byte_in_the_gzip_stream_is_an_error_naming_the_file(root, tmp_path):
    folder = _copy_mnist(root, tmp_path)
    path = folder / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_mnist(data_dir=folder)


def test_truncated_file_is_an_error_naming_the_file(root, tmp_path):
    folder = _copy_mnist(root, tmp_path)
    path = folder / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_mnist(data_dir=folder)


def test_raw_uncompressed_idx_files_load_the_same(root, tmp_path):
    (folder := tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(gzip.decompress((root / "data" / "mnist" / (name + ".gz")).read_bytes()))
    (a, _), (b, _) = load_mnist(data_dir=tmp_path)
    (a2, _), (b2, _) = load_mnist()
    assert np.array_equal(a, a2) and np.array_equal(b, b2)


def test_missing_file_names_it(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: file not found"):
        load_mnist(data_dir=tmp_path)


def test_read_idx_rejects_inconsistent_header(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(9))
    with pytest.raises(DataError, match="truncated or corrupted"):
        read_idx(path)
    path.write_bytes(b"\x89PNG" + bytes(10))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def _idx(array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.tobytes())


def test_full_mnist_downloads_checks_md5_and_caches(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte.gz": _idx(rng.integers(0, 10, 60, dtype=np.uint8)),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte.gz": _idx(rng.integers(0, 10, 10, dtype=np.uint8)),
    }
    for name, payload in files.items():
        (served / name).write_bytes(payload)
    monkeypatch.setattr(data, "MNIST_FULL", {n: hashlib.md5(p).hexdigest() for n, p in files.items()})
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}/"
        (xtr, ytr), (xte, yte) = load_mnist(full=True, cache_dir=tmp_path / "cache", mirrors=(mirror,))
    finally:
        server.shutdown()
    assert xtr.shape == (60, 28, 28) and ytr.shape == (60,) and xte.shape == (10, 28, 28)
    # cached: works with the server gone
    (xtr2, _), _ = load_mnist(full=True, cache_dir=tmp_path / "cache", mirrors=(mirror,))
    assert np.array_equal(xtr, xtr2)


def test_full_mnist_offline_says_what_to_do(tmp_path):
    mirror = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(DataError, match="offline.*Copy the four canonical MNIST files.*full=False"):
        load_mnist(full=True, cache_dir=tmp_path, mirrors=(mirror,))


def test_full_mnist_rejects_a_download_with_the_wrong_md5(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for name in data.MNIST_FULL:
        (served / name).write_bytes(b"not mnist")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError, match="differs from the published"):
            load_mnist(full=True, cache_dir=tmp_path / "c", mirrors=(f"http://127.0.0.1:{server.server_address[1]}/",))
    finally:
        server.shutdown()
    assert not list((tmp_path / "c").glob("*.gz"))


def test_shipped_images_match_the_checksums_in_data_readme(root):
    readme = (root / "data" / "README.md").read_text()
    listed = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (images/\S+)$", readme, re.M))
    assert len(listed) == 5
    for name, digest in listed.items():
        assert hashlib.sha256((root / "data" / name).read_bytes()).hexdigest() == digest, name


def test_load_image_rgb_photograph(root):
    img = load_image(root / "data" / "images" / "chelsea.png")
    assert img.shape == (300, 451, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    ref = np.asarray(Image.open(root / "data" / "images" / "chelsea.png").convert("RGB"), dtype=np.float64) / 255
    np.testing.assert_allclose(img, ref, atol=1e-6)


def test_load_image_grayscale_rgba_palette_and_16_bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.shape == (3, 4, 3) and np.allclose(out[..., 1], gray / 255)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[0, 0, 3] = 255  # opaque
    rgba[1, 1, 3] = 0  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert np.allclose(out[0, 0], [1, 0, 0]) and np.allclose(out[1, 1], [1, 1, 1])

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    assert np.allclose(out[0, 0], [0, 0, 1]) and np.allclose(out[0, 1], [0, 1, 0])

    deep = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    assert np.allclose(out[..., 0], deep / 65535, atol=1e-6)


def test_load_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:10, :10] = [255, 0, 0]  # a red block in the top-left corner
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (30, 20, 3)
    assert out[3, 16, 0] > 0.8 and out[3, 16, 1] < 0.2  # the red corner moved to the top right
    assert out[3, 3, 0] < 0.2


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"definitely not an image")
    with pytest.raises(DataError, match="junk.png: not a readable image"):
        load_image(tmp_path / "junk.png")


def test_save_image_round_trips_and_validates(tmp_path):
    img = np.random.default_rng(1).random((5, 7, 3)).astype(np.float32)
    save_image(tmp_path / "out.png", img)
    back = load_image(tmp_path / "out.png")
    assert np.abs(back - img).max() <= 0.5 / 255 + 1e-6
    assert list(tmp_path.iterdir()) == [tmp_path / "out.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="array.shape"):
        save_image(tmp_path / "x.png", np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        save_image(tmp_path / "x.png", np.full((2, 2, 3), np.nan))


def test_atomic_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name what fsync flushed")
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(dst))), replace(src, dst))[1])
    data.atomic_write(tmp_path / "out.bin", lambda tmp: open(tmp, "wb").write(b"payload"))
    assert events == [("fsync", events[0][1]), ("replace", str(tmp_path / "out.bin")), ("fsync", str(tmp_path))]
    assert data.is_temporary(events[0][1]) and (tmp_path / "out.bin").read_bytes() == b"payload"


def test_a_writer_killed_mid_write_leaves_the_old_file_and_a_temporary_the_next_cleanup_removes(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "model.npz"
    target.write_bytes(b"old")
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from pathlib import Path; from workshop_lib.data import atomic_write\n"
        "def write(tmp):\n"
        "    Path(tmp).write_bytes(b'half of the new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"), str(target)], timeout=60)
    assert killed.returncode == -9
    assert target.read_bytes() == b"old"
    (temporary,) = [p for p in tmp_path.iterdir() if p != target]
    assert data.is_temporary(temporary) and temporary.name.startswith("model.npz.tmp")
    (tmp_path / "notes.txt.tmp4194305-abc.txt").write_bytes(b"")  # a dead writer's, but not under "model"
    assert data.remove_stale_temporaries(tmp_path, "model") == [temporary]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "notes.txt.tmp4194305-abc.txt"]
    # and the next write of a file removes what a killed writer of that file left
    (tmp_path / "notes.txt").write_bytes(b"old notes")
    data.atomic_write(tmp_path / "notes.txt", lambda tmp: Path(tmp).write_bytes(b"new notes"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "notes.txt"]


@pytest.mark.parametrize("out, expected", [
    ("/proc/x.npz", "cannot write in the folder /proc"),
    (".", "is a folder"),
    ("model.txt", "the extension '.txt' is not one this output can have"),
    ("a_file/x.npz", "a_file is a file, not a folder"),
    ("missing/../../escape.npz", "does not exist ('..' after a missing folder"),
    ("", "not a file name"),
])
def test_check_output_path_names_argument_value_and_expected(tmp_path, monkeypatch, out, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError) as info:
        data.check_output_path(out, (".npz",), "--out")
    message = str(info.value)
    assert message.startswith(f"--out={out!r}: ") and expected in message, message
    assert message.endswith("expected a writable file path ending in .npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the check leaves nothing behind
    assert data.check_output_path("new/sub/m.NPZ", (".npz",), "--out") == Path("new/sub/m.NPZ")
    assert not (tmp_path / "new").exists()  # folders are the writer's to make, not the check's


def test_check_output_path_finds_a_full_disk_before_the_work(tmp_path):
    import os
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and a kernel that allows it)")
    try:
        with open(mount / "filler", "wb") as f:
            try:
                f.write(b"\0" * 65536)
            except OSError:
                pass
        with pytest.raises(ValueError, match=r"cannot write in the folder .*full \(No space left on device\)"):
            data.check_output_path(mount / "m.npz", (".npz",), "--out")
    finally:
        subprocess.run(["umount", str(mount)], check=True)
