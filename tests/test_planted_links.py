"""No planted link redirects a write, and concurrent writers never expose a partial or foreign file (issue 32):
every file is written through a new temporary file of a unique name in its folder (created with O_EXCL), renamed
over its final name; the run's lock is opened without following a link."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from promoe.errors import error_message, write_text_atomically, written_atomically


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file that a planted link points at: no write of ours may change it."""
    path = tmp_path / "victim.txt"
    path.write_text("keep me")
    return path


def planted_link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def test_a_link_planted_at_the_temporary_name_or_the_final_name_is_not_written_through(tmp_path, victim):
    out = tmp_path / "out"
    planted_link(out / "notes.json.tmp", victim)
    write_text_atomically(out / "notes.json", "{}")
    assert victim.read_text() == "keep me" and (out / "notes.json").read_text() == "{}"
    planted_link(out / "final.json", victim)
    write_text_atomically(out / "final.json", "[]")
    assert victim.read_text() == "keep me"
    assert not (out / "final.json").is_symlink() and (out / "final.json").read_text() == "[]"


def test_a_run_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, victim):
    from promoe.training.folder import LOCK, _take_lock

    planted_link(tmp_path / "run" / LOCK, victim)
    held, refusal = _take_lock(tmp_path / "run")
    assert held is None and victim.read_text() == "keep me"
    assert refusal == (f"error: cannot use {tmp_path / 'run'} as the run folder: {tmp_path / 'run' / LOCK} is a link "
                       f"(to {victim}); promoe does not write through links: remove it")


def test_a_samples_npz_tmp_link_in_the_output_folder_is_not_written_through(tmp_path, victim):
    from promoe.sample import collect, png_name
    from promoe.sampling import save_png

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    labels = torch.arange(3)
    for index, image in enumerate(images):
        save_png(image, tmp_path / png_name(index, index))
    planted_link(tmp_path / "samples.npz.tmp", victim)
    collect(tmp_path, labels, grid_columns=0)
    assert victim.read_text() == "keep me" and not (tmp_path / "samples.npz").is_symlink()
    with np.load(tmp_path / "samples.npz") as archive:
        assert np.array_equal(archive["arr_0"], images)


def test_a_latest_tmp_link_is_not_written_through_by_a_checkpoint(tmp_path, victim):
    import torch.distributed as dist

    from promoe.training.checkpoints import Checkpoints
    from tests.test_run_faults import tiny_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        config, model, optimizer, ema = tiny_state()
        planted_link(tmp_path / "run" / "checkpoints" / "latest.tmp", victim)
        planted_link(tmp_path / "run" / "checkpoints" / "step_0000001.tmp", tmp_path)
        Checkpoints(tmp_path / "run", keep=2).save(1, model, optimizer, ema, config, {})
    finally:
        dist.destroy_process_group()
    assert victim.read_text() == "keep me"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000001"
    assert (tmp_path / "run" / "checkpoints" / "step_0000001" / "manifest.json").is_file()
    assert not (tmp_path / "config.json").exists()  # nothing written into the folder the planted link named


def test_two_writers_of_one_file_each_rename_a_whole_file_of_their_own(tmp_path):
    path = tmp_path / "samples.npz"
    with written_atomically(path) as first:
        with written_atomically(path) as second:
            assert first != second
            first.write_bytes(b"a" * 1000)
            second.write_bytes(b"b" * 10)
        assert path.read_bytes() == b"b" * 10
    assert path.read_bytes() == b"a" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_written_files_take_the_mode_of_the_umask(tmp_path):
    from promoe.weights import save_weights
    from tests.helpers import tiny_model

    model = tiny_model("ProMoE-S")
    previous = os.umask(0o027)
    try:
        save_weights(tmp_path / "ema.safetensors", model.state_dict(), model.config)
        write_text_atomically(tmp_path / "config.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "ema.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_while_writing_through_a_file_object_names_the_file(tmp_path):
    path = tmp_path / "samples.png"
    with pytest.raises(OSError) as failed:
        with written_atomically(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write to an open file reports it
    assert error_message(failed.value).startswith(f"{path}: No space left on device: the disk is full")
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_writes_of_any_temporary_name_are_removed(tmp_path, capsys):
    from promoe.training.folder import remove_leftovers

    with pytest.raises(KeyboardInterrupt):
        with written_atomically(tmp_path / "ema.safetensors") as tmp:
            tmp.write_bytes(b"half")
            os.link(tmp, tmp_path / "kept-by-a-kill")  # what a kill leaves: the temporary file, whole or half
            raise KeyboardInterrupt
    os.rename(tmp_path / "kept-by-a-kill", tmp)
    (tmp_path / "notes.txt").write_text("not ours to remove")
    remove_leftovers(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]
    assert f"removed {tmp}" in capsys.readouterr().out
