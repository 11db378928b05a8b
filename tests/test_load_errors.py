"""What ``load_file`` says about a file it cannot load: one line that names the file and what it is (corrupt,
truncated, another kind of file), with ``--trust-checkpoint`` offered only for a genuine PyTorch file whose pickle
needs code, naming that code. Every fixture is built here, from real files."""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vanillakd.checkpoint import load_file
from vanillakd.errors import UserError, run_cli


class Picklable:
    """A class only this module defines: a checkpoint holding one needs this code to load."""

    def __init__(self):
        self.value = 3


def small_state() -> dict:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3), "fc.bias": torch.randn(5)}


def message(path, trust: bool = False) -> str:
    with pytest.raises(UserError) as e:
        load_file(path, trust=trust)
    text = str(e.value)
    assert "\n" not in text and str(path) in text, text
    return text


# ---------------------------------------------------------------- files that are no checkpoint at all

def _text(p):
    p.write_text("model: resnet50\nepochs: 3\nlr: 0.1\n")


def _html(p):
    p.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")


def _text_starting_with_c(p):  # 'c' is pickle's GLOBAL opcode: such text reads as a pickle naming a global
    p.write_text("checkpoint_hist: 10\nmodel: resnet50\n")


def _random(p):
    p.write_bytes(b"\x00" + os.urandom(4095))


def _empty(p):
    p.write_bytes(b"")


def _npy(p):
    with open(p, "wb") as f:
        np.save(f, np.zeros((4, 4), np.float32))


def _plain_pickle(p):
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))


def _other_zip(p):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


NOT_CHECKPOINTS = {
    "text": (_text, "text file beginning 'model: resnet50"),
    "html": (_html, "text file beginning '<!DOCTYPE html>"),
    "text-c": (_text_starting_with_c, "text file beginning 'checkpoint_hist"),
    "random": (_random, "match no checkpoint format"),
    "empty": (_empty, "empty (0 bytes)"),
    "npy": (_npy, "NumPy .npy"),
    "plain-pickle": (_plain_pickle, "pickle that torch.save did not write"),
    "other-zip": (_other_zip, "zip archive without PyTorch's data.pkl"),
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
@pytest.mark.parametrize("trust", [False, True])
def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path, kind, trust):
    make, expected = NOT_CHECKPOINTS[kind]
    path = tmp_path / "model.pth"
    make(path)
    text = message(path, trust)
    assert "corrupt or not a PyTorch checkpoint" in text and expected in text, text
    # the wrong diagnosis torch's weights-only error leads to, and advice to do the unsafe thing
    assert "--trust-checkpoint" not in text and "pickled" not in text, text


def test_a_folder_is_no_checkpoint(tmp_path):
    (tmp_path / "ckpt.pth").mkdir()
    assert "is a folder, not a checkpoint file" in message(tmp_path / "ckpt.pth")


# ---------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("cut", [0.01, 0.5, 0.99])
def test_a_truncated_checkpoint_is_called_truncated(tmp_path, cut, legacy):
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": small_state(), "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    for trust in (False, True):
        text = message(path, trust)
        assert "corrupt or truncated" in text and "--trust-checkpoint" not in text, text
        if not legacy:  # not torch's internals (miniz), but what it means
            assert "incomplete zip archive" in text and "miniz" not in text, text


# ---------------------------------------------------------------- genuine pickles that need code

@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_needing_code_names_it_and_says_what_trust_means(tmp_path, legacy):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": small_state(), "extra": Picklable()}, path, _use_new_zipfile_serialization=not legacy)
    text = message(path)
    assert f"{Picklable.__module__}.Picklable" in text, text
    assert "--trust-checkpoint" in text and "runs" in text and "trust" in text, text
    assert load_file(path, trust=True)["extra"].value == 3


def test_numpy_arrays_in_a_checkpoint_are_named(tmp_path):
    path = tmp_path / "with_numpy.pth"
    torch.save({"state_dict": small_state(), "mean": np.zeros(3)}, path)
    text = message(path)
    assert "numpy" in text and "ndarray" in text and "--trust-checkpoint" in text, text
    assert np.array_equal(load_file(path, trust=True)["mean"], np.zeros(3))


def test_code_a_trusted_file_needs_but_that_is_missing_is_named(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"extra": Picklable()}, path)
    data = path.read_bytes().replace(Picklable.__module__.encode(), b"gone_module"[: len(Picklable.__module__)]
                                     .ljust(len(Picklable.__module__), b"x"))
    path.write_bytes(data)
    text = message(path, trust=True)
    assert "needs Python code that is not available here" in text and "No module named" in text, text


# ---------------------------------------------------------------- files that do load

def test_good_files_load(tmp_path):
    state = small_state()
    torch.save({"state_dict": state, "args": argparse.Namespace(model="resnet50")}, tmp_path / "seed.pth.tar")
    assert load_file(tmp_path / "seed.pth.tar")["args"].model == "resnet50"
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(tmp_path / "legacy.pth")["fc.bias"], state["fc.bias"])
    save_file(state, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["fc.bias"], state["fc.bias"])
    save_file(state, tmp_path / "w_named.pth")  # a safetensors file under another name loads by its content
    assert torch.equal(load_file(tmp_path / "w_named.pth")["fc.bias"], state["fc.bias"])


# ---------------------------------------------------------------- safetensors

def _safetensors_bytes(tmp_path) -> bytes:
    save_file(small_state(), tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "corrupt or truncated (safetensors:"),
    ("header-cut", "corrupt or truncated (safetensors:"),
    ("empty", "empty (0 bytes)"),
    ("text", "text file beginning"),
    ("random", "match no checkpoint format"),
    ("torch", "not a safetensors file but a PyTorch checkpoint"),
])
def test_a_corrupt_safetensors_file_is_one_line(tmp_path, damage, expected):
    good = _safetensors_bytes(tmp_path)
    path = tmp_path / "model.safetensors"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "header-cut":
        path.write_bytes(good[:20])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("hello, this is not a tensor file\n")
    elif damage == "random":
        path.write_bytes(b"\x00" * 9 + os.urandom(2000))
    else:
        torch.save(small_state(), path)
    text = message(path)
    assert expected in text and "Error while deserializing" not in text, text
    if damage != "torch":
        assert "corrupt" in text, text


# ---------------------------------------------------------------- through an entry point

def test_validate_reports_a_text_checkpoint_in_one_line(tiny_data, tmp_path, capsys):
    from vanillakd.cli import validate
    bad = tmp_path / "downloaded.pth"
    bad.write_text("<html><body>Sign in to continue</body></html>\n")
    rc = run_cli(validate.cli, [str(tiny_data), "--model", "test_resnet", "--checkpoint", str(bad), "-b", "4",
                                "--img-size", "32", "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("validate.py: error: ") and str(bad) in lines[0], err
    assert "not a PyTorch checkpoint" in lines[0] and "--trust-checkpoint" not in lines[0], err


def test_a_foreign_pickle_is_not_unpickled_even_when_trusted(tmp_path, monkeypatch):
    """torch.load reads a foreign pickle (trusted) before it finds torch's magic number missing: its code would
    run first. A pickle that torch.save did not write is refused before anything unpickles it."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pth"
    path.write_bytes(b"cos\nsystem\n(S'touch PWNED_BY_TEXT_PICKLE'\ntR.")  # a protocol-0 pickle: text
    assert "text file" in message(path, trust=True)
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    assert "pickle that torch.save did not write" in message(path, trust=True)
    assert not list(tmp_path.glob("PWNED*"))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_flipped_bytes_in_a_tensor_are_found_by_the_checksums(tmp_path):
    """torch.load does not check the zip's CRC-32s; load_file does, so damaged weights never load silently."""
    path = tmp_path / "c.pth"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the local header's size
    data_at = raw.index(b"\x00\x00\x80\x3f", start)  # the value 1.0 inside the tensor's bytes
    raw[data_at:data_at + 4] = b"\x00\x00\x00\x40"  # now 2.0
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["w"][1] == 2.0  # torch itself loads the damage
    with pytest.raises(UserError, match=r"is corrupt: its part .*data/0 does not match its checksum"):
        load_file(path)
