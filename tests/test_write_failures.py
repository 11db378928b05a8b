"""Every write fails with one line naming the file and the reason (a full disk, a missing or read-only folder),
leaves the previous file and no temp file, honours the umask, and never writes into bytes another name shares.

Failures are real: a full disk is a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) in a child process, so
write() fails with EFBIG through the real torch.save / numpy / logging paths; a read-only folder is one in /proc
or /sys (this suite may run as root, whom chmod does not stop); a missing folder is one under a regular file."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, save_teacher
from vanillakd.checkpoint import (
    atomic_save,
    atomic_write,
    atomic_write_many,
    atomic_write_text,
    remove_stale_temps,
    temp_name_pattern,
)
from vanillakd.errors import UserError
from vanillakd.outputs import CheckpointWriter, Summary, add_log_file, write_args

LIMIT = 64 * 1024  # the "disk" of the child processes: files stop growing here


def in_full_disk(code: str, limit: int = LIMIT) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose files cannot grow beyond ``limit`` bytes; the child prints ``ERROR: ...``
    for the UserError it ends with, ``NO ERROR`` when it ends without one."""
    prelude = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from vanillakd.errors import UserError
        try:
    """)
    body = textwrap.indent(textwrap.dedent(code), "    ")
    ending = "\nexcept UserError as e:\n    print('ERROR: ' + str(e))\nelse:\n    print('NO ERROR')\n"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", prelude + body + ending], capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("ERROR: ")]
    assert result.returncode == 0 and len(lines) == 1, result.stdout + result.stderr[-3000:]
    return lines[0][len("ERROR: "):]


def only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_fails_a_checkpoint_save_in_one_line(tmp_path):
    path = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(2)}, path)
    result = in_full_disk(f"""
        import torch
        from vanillakd.checkpoint import atomic_save
        atomic_save({{"a": torch.zeros(100_000)}}, {str(path)!r})
    """)
    line = error_line(result)
    assert f"could not write {path}" in line and "File too large" in line, line
    assert "Traceback" not in result.stderr, result.stderr
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))  # the previous file, whole
    assert only(tmp_path) == ["last.pth.tar"]  # no temp file


def test_a_full_disk_fails_a_cache_epoch_in_one_line_and_leaves_no_partial_folder(tmp_path):
    result = in_full_disk(f"""
        from vanillakd.teachers.cache import EpochWriter, Storage
        EpochWriter({str(tmp_path)!r}, 0, 0, Storage(topk=0, dtype="float32", num_classes=1000, batch_size=8,
                                                     steps=10))
    """)
    line = error_line(result)
    assert "could not write the teacher cache epoch" in line and "epoch0000-rank0" in line, line
    assert only(tmp_path) == []


def test_a_full_disk_is_one_warning_line_for_a_log_file(tmp_path):
    log = tmp_path / "log.txt"
    result = in_full_disk(f"""
        import logging
        from pathlib import Path
        from vanillakd.outputs import add_log_file
        logger = logging.getLogger("fill")
        logger.setLevel(logging.INFO)
        add_log_file(logger, Path({str(log)!r}))
        for i in range(200):
            logger.info("x" * 1000)
    """)
    assert "NO ERROR" in result.stdout, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "could not write the log file" in warnings[0] and str(log) in warnings[0], \
        result.stderr[-3000:]


# ---------------------------------------------------------------- missing and read-only folders

def blocked_folders(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-file").write_text("x")
    return {"missing": (tmp_path / "missing" / "sub", "does not exist"),
            "under-a-file": (tmp_path / "a-file" / "sub", "is a file, not a folder"),
            "proc": (Path("/proc"), "cannot create files in /proc"),
            "sys": (Path("/sys/kernel"), "/sys/kernel")}


@pytest.mark.parametrize("where", ["missing", "under-a-file", "proc", "sys"])
def test_a_write_into_a_folder_that_cannot_take_it_is_one_line(tmp_path, where):
    folder, reason = blocked_folders(tmp_path)[where]
    for write in (lambda p: atomic_save({"a": torch.ones(1)}, p), lambda p: atomic_write_text("x", p),
                  lambda p: write_args(p.parent, {"lr": 0.1}), lambda p: Summary(p).add({"epoch": 0})):
        with pytest.raises(UserError) as e:
            write(folder / "out.file")
        text = str(e.value)
        assert "\n" not in text and "could not write" in text and str(folder) in text and reason in text, text


def test_validate_results_file_is_checked_before_the_evaluation(tmp_path):
    from vanillakd.validation import check_results_file, write_results
    (tmp_path / "a-file").write_text("x")
    for bad, reason in ((tmp_path / "missing" / "r.json", "does not exist"),
                        (tmp_path / "a-file" / "r.json", "is a file, not a folder"), (tmp_path, "is a folder")):
        with pytest.raises(UserError, match=reason):
            check_results_file(str(bad))
    with pytest.raises(UserError, match="could not write .*does not exist"):
        write_results({"top1": 1.0}, str(tmp_path / "missing" / "r.csv"))
    check_results_file(str(tmp_path / "r.json"))
    assert only(tmp_path) == ["a-file"]  # the check leaves nothing behind


def test_export_checks_its_folder_before_loading(tmp_path):
    from vanillakd.export import export_checkpoint
    (tmp_path / "a-file").write_text("x")
    # the checkpoint does not even exist: the folder is what the user hears about first
    with pytest.raises(UserError, match="export folder .* is not writable: .* is a file, not a folder"):
        export_checkpoint(tmp_path / "none.pth", tmp_path / "a-file" / "export")
    with pytest.raises(UserError, match="does not exist"):
        export_checkpoint(tmp_path / "none.pth", tmp_path / "export")
    assert only(tmp_path) == ["a-file"]  # a refused export leaves no empty folder


def test_report_and_compare_check_their_folder_first(tmp_path):
    from test_report import fake_run

    from vanillakd.tools.compare import build_grid, compare
    from vanillakd.tools.report import report
    (tmp_path / "a-file").write_text("x")
    fake_run(tmp_path / "runs" / "a0")
    with pytest.raises(UserError, match="report folder .* is not writable: .* is a file, not a folder"):
        report([tmp_path / "runs"], tmp_path / "a-file" / "rep")
    grid, recipe = build_grid({"data_dir": str(tmp_path), "model": "test_resnet", "teacher": "test_resnet",
                               "teacher_pretrained": str(tmp_path / "t.pth"), "output": str(tmp_path / "a-file" / "c")})
    with pytest.raises(UserError, match="compare --output .* is not writable"):
        compare(grid, recipe, run_argv=lambda argv: pytest.fail("trained despite an unwritable --output"))


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from vanillakd.tools.report import save_figure
    fig, _ = plt.subplots()
    with pytest.raises(UserError, match="could not write .*does not exist"):
        save_figure(fig, tmp_path / "missing" / "curves.png", plt)
    fig, _ = plt.subplots()
    save_figure(fig, tmp_path / "curves.png", plt)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and only(tmp_path) == ["curves.png"]


def test_a_zoo_folder_that_cannot_be_written_fails_before_the_download(tmp_path, monkeypatch):
    import urllib.request

    from vanillakd import zoo
    (tmp_path / "a-file").write_text("x")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("VANILLAKD_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded into an unwritable folder"))
    with pytest.raises(UserError, match="zoo folder .* is not writable: .* is a file, not a folder"):
        zoo.fetch("resnet50", tmp_path / "a-file" / "zoo", progress=False)


def test_files_that_belong_together_are_replaced_together(tmp_path):
    a, b = tmp_path / "model.safetensors", tmp_path / "missing" / "config.json"
    a.write_text("old")
    with pytest.raises(UserError, match="does not exist"):
        atomic_write_many({a: lambda f: f.write(b"new"), b: lambda f: f.write(b"{}")})
    assert a.read_text() == "old" and only(tmp_path) == ["model.safetensors"]


# ---------------------------------------------------------------- killed mid-save

def test_a_save_killed_midway_leaves_a_temp_that_start_up_removes(tmp_path):
    path = tmp_path / "checkpoint-3.pth.tar"
    path.write_bytes(b"previous")
    code = textwrap.dedent(f"""
        import os, signal
        from vanillakd.checkpoint import atomic_write
        def half(f):
            f.write(b"half of a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(path)!r}, half)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == -signal.SIGKILL
    temps = sorted(tmp_path.glob(temp_name_pattern(path.name)))
    assert len(temps) == 1 and path.read_bytes() == b"previous"
    assert temps[0].stat().st_mode & 0o777 == 0o666 & ~current_umask()  # even a temp honours the umask
    assert remove_stale_temps(tmp_path) == temps and only(tmp_path) == [path.name]


def current_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# ---------------------------------------------------------------- the umask

@pytest.fixture(params=[(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param[0])
    yield request.param[1]
    os.umask(old)


def test_outputs_honour_the_umask(tmp_path, umask):
    atomic_save({"a": torch.ones(1)}, tmp_path / "ckpt.pth")
    atomic_write_text("x", tmp_path / "notes.md")
    write_args(tmp_path, {"lr": 0.1})
    Summary(tmp_path / "summary.csv").add({"epoch": 0})
    CheckpointWriter(tmp_path).save_last({"a": torch.ones(1)}, epoch=0, history=1)
    atomic_write(tmp_path / "arr.npy", lambda f: np.save(f, np.zeros(2)))
    logger = logging.getLogger("umask-test")
    handler = add_log_file(logger, tmp_path / "log.txt")
    logger.removeHandler(handler)
    handler.close()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes) == {"ckpt.pth", "notes.md", "args.yaml", "summary.csv", "last.pth.tar", "checkpoint-0.pth.tar",
                          "arr.npy", "log.txt"}
    assert modes == dict.fromkeys(modes, umask), {k: oct(v) for k, v in modes.items()}


def test_an_export_honours_the_umask(tmp_path, umask):
    from vanillakd.export import export_checkpoint
    ckpt = save_teacher(tmp_path / "t.pth")
    out = export_checkpoint(ckpt, tmp_path / "export", model="test_resnet")
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"model.safetensors": umask,
                                                                          "config.json": umask}


# ---------------------------------------------------------------- no bytes shared between two names

def test_the_epoch_checkpoint_is_a_copy_not_a_second_name(tmp_path):
    writer = CheckpointWriter(tmp_path)
    writer.save_last({"a": torch.arange(1000.0)}, epoch=0, history=2)
    last, backup = tmp_path / "last.pth.tar", tmp_path / "checkpoint-0.pth.tar"
    assert last.stat().st_ino != backup.stat().st_ino and last.stat().st_nlink == backup.stat().st_nlink == 1
    with open(last, "r+b") as f:  # damage in place: a truncation
        f.truncate(100)
    assert torch.equal(torch.load(backup, weights_only=True)["a"], torch.arange(1000.0))
    writer.save_last({"a": torch.zeros(3)}, epoch=1, history=2)
    assert only(tmp_path) == ["checkpoint-0.pth.tar", "checkpoint-1.pth.tar", "last.pth.tar"]


def test_a_log_with_a_second_name_is_unlinked_before_it_is_appended_to(tmp_path):
    log, backup = tmp_path / "log.txt", tmp_path / "backup-log.txt"
    log.write_text("epoch 0 done\n")
    os.link(log, backup)  # as `cp -al run run.bak` leaves it
    logger = logging.getLogger("link-test")
    logger.setLevel(logging.INFO)
    handler = add_log_file(logger, log)
    logger.info("resumed")
    logger.removeHandler(handler)
    handler.close()
    assert backup.read_text() == "epoch 0 done\n" and backup.stat().st_nlink == 1
    assert log.read_text().startswith("epoch 0 done\n") and log.read_text().rstrip().endswith("resumed")


def test_a_log_file_in_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"could not open the log file .*: the folder .* does not exist"):
        add_log_file(logging.getLogger("missing-test"), tmp_path / "missing" / "log.txt")


# ---------------------------------------------------------------- damaged teacher caches

def small_cache(root: Path) -> tuple[Path, dict]:
    """A one-epoch full-logit cache folder as cache-teacher leaves it, with its manifest."""
    from vanillakd.teachers import cache as tc
    storage = tc.Storage(topk=0, dtype="float32", num_classes=3, batch_size=4, steps=2)
    writer = tc.EpochWriter(root, 0, 0, storage)
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    for step in range(2):
        writer.add(step, torch.randn(4, 3), tc.input_fingerprint(x, target))
    writer.commit()
    tc.save_val_predictions(root, torch.tensor([0, 1, 2]))
    manifest = {"version": tc.FORMAT_VERSION, "stream": {"num_classes": 3, "batch_size": 4, "steps_per_epoch": 2},
                "storage": {"topk": 0, "dtype": "float32"}, "teacher": {"name": "t"}, "epochs_done": [0],
                "val": {"files": "v", "images": 3}}
    tc.write_manifest(root, manifest)
    return tc.epoch_dir(root, 0, 0), manifest


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _cut_header(p):
    p.write_bytes(p.read_bytes()[:40])


def _empty(p):
    p.write_bytes(b"")


def _other_shape(p):
    np.save(p, np.zeros((2, 4, 5), np.float32))


def _other_dtype(p):
    np.save(p, np.zeros((2, 4, 3), np.float16))


def _extra_bytes(p):
    p.write_bytes(p.read_bytes() + b"\0" * 16)


@pytest.mark.parametrize("damage, expected", [
    (_truncate, "truncated or unreadable"), (_cut_header, "truncated or unreadable"),
    (_empty, "truncated or unreadable: 0 bytes"), (Path.unlink, "missing"),
    (_other_shape, "the cache's format is float32 (2, 4, 3)"), (_other_dtype, "holds float16"),
    (_extra_bytes, "bytes where its array takes"),
])
def test_a_damaged_cache_array_is_one_line_naming_the_file(tmp_path, damage, expected):
    from vanillakd.teachers import cache as tc
    folder, manifest = small_cache(tmp_path)
    damage(folder / "logits.npy")
    teacher = tc.CachedTeacher(tmp_path, manifest, 0, torch.device("cpu"))
    with pytest.raises(UserError) as e:
        teacher.batch_output(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), 0, 0)
    text = str(e.value)
    assert "\n" not in text and str(folder / "logits.npy") in text and "damaged" in text and expected in text, text
    assert "vanillakd cache-teacher" in text, text


def test_damaged_val_predictions_are_one_line(tmp_path):
    from vanillakd.teachers import cache as tc
    _, manifest = small_cache(tmp_path)
    _truncate(tmp_path / tc.VAL_TOP1)
    teacher = tc.CachedTeacher(tmp_path, manifest, 0, torch.device("cpu"))
    with pytest.raises(UserError, match=f"{tc.VAL_TOP1} is damaged"):
        teacher.val_predictions("v", 2)


@pytest.mark.parametrize("text, expected", [
    ('{"version": 1, "stream": {', "is not valid JSON"), ("", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"), ('{"version": 1, "storage": {}}', "no 'stream' section"),
    ('{"version": 1, "stream": {"num_classes": 3}, "storage": {"topk": 0}}', "storage.dtype"),
])
def test_a_damaged_manifest_is_one_line(tmp_path, text, expected):
    from vanillakd.teachers import cache as tc
    (tmp_path / tc.MANIFEST).write_text(text)
    with pytest.raises(UserError) as e:
        tc.read_manifest(tmp_path)
    message = str(e.value)
    assert "\n" not in message and expected in message and "damaged" in message, message


def test_a_damaged_cache_is_refused_before_training_and_recached(tiny_data, teacher_ckpt, tmp_path, capsys):
    """The truncated array stops train-kd at start-up in one line; the same cache-teacher command then rewrites
    the damaged epoch and removes what killed writers left (a manifest temp, a half epoch folder)."""
    from test_teacher_cache import LIGHT_AUG, flags, refusal, with_flag

    from vanillakd.cli import cache_teacher, train_kd
    argv = with_flag(flags(tiny_data, teacher_ckpt, tmp_path / "runs", LIGHT_AUG), "--epochs", "1")
    cache = tmp_path / "cache"
    command = argv + ["--cache-dir", str(cache), "--cache-topk", "2"]
    assert cache_teacher.main(command) == 0
    values = cache / "epoch0000-rank0" / "values.npy"
    whole = values.read_bytes()
    values.write_bytes(whole[: len(whole) // 2])
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "r", "--teacher-cache", str(cache)])
    assert str(values) in line and "damaged" in line and "cache-teacher" in line, line
    assert not (tmp_path / "runs" / "r" / "last.pth.tar").exists()
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from vanillakd.checkpoint import atomic_write
        atomic_write({str(cache / "manifest.json")!r}, lambda f: os.kill(os.getpid(), signal.SIGKILL))
    """)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert killed.returncode == -signal.SIGKILL and list(cache.glob(temp_name_pattern("manifest.json")))
    (cache / "epoch0001-rank0.partial").mkdir()
    (cache / "epoch0001-rank0.partial" / "values.npy").write_bytes(b"half")
    assert cache_teacher.main(command) == 0
    assert values.stat().st_size == len(whole) and np.load(values).shape[:2] == (6, 4)
    assert only(cache) == ["epoch0000-rank0", "manifest.json", "val_top1.npy"]
    assert json.loads((cache / "manifest.json").read_text())["epochs_done"] == [0]
