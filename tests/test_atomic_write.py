"""repa_fast.atomic_write: a file is the old one or the complete new one, never a torn one."""
import json
import os

import pytest

from repa_fast.atomic_write import atomic_open, atomic_path, temporary_name, write_json_atomic


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("sync", [True, False])
def test_atomic_open_replaces_the_file_when_the_block_ends(tmp_path, sync):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_open(path, "wb", sync=sync) as f:
        f.write(b"new content")
        assert path.read_bytes() == b"old"  # nothing visible before the block ends
    assert path.read_bytes() == b"new content"
    assert listing(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_open(path, "wb") as f:
            f.write(b"half")
            raise error
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["ckpt.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "out.json") as tmp:
            open(tmp, "w").write("{")
            raise ValueError("serialisation failed")
    assert listing(tmp_path) == []


def test_atomic_path_hands_a_library_a_path_in_the_same_folder(tmp_path):
    path = tmp_path / "w.safetensors"
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same file system: the rename is atomic
        assert tmp == temporary_name(path)
        with open(tmp, "wb") as f:
            f.write(b"x" * 10)
    assert path.read_bytes() == b"x" * 10


def test_unique_temporary_names_differ_by_process(tmp_path):
    name = temporary_name(tmp_path / "cache.npz", unique=True)
    assert name == f"{tmp_path / 'cache.npz'}.{os.getpid()}.tmp"
    assert temporary_name(tmp_path / "cache.npz") == f"{tmp_path / 'cache.npz'}.tmp"


def test_a_stale_temporary_from_a_killed_run_is_overwritten(tmp_path):
    path = tmp_path / "index.json"
    open(temporary_name(path), "w").write("garbage from a killed run")
    write_json_atomic(path, {"b": 1, "a": [2]}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": [2], "b": 1}
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert listing(tmp_path) == ["index.json"]


def test_atomic_open_refuses_a_read_mode(tmp_path):
    with pytest.raises(ValueError, match=r"mode must be a write mode.*'rb'"):
        with atomic_open(tmp_path / "x", "rb"):
            pass
