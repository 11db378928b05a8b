"""Checkpoint files: atomic writes, weights-only loading, clear errors for foreign or damaged files."""
from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch

from vanillakd.checkpoint import atomic_save, load_file, plain
from vanillakd.errors import UserError
from vanillakd.weights import load_weights
from vanillakd.weights import select_state as extract_state_dict


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_atomic_save_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(3)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(3)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]


def test_pickled_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Evil()}, f)
    with pytest.raises(UserError, match="pickled Python objects"):
        load_file(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_reported(tmp_path, cut):
    path = tmp_path / "c.pth"
    torch.save({"state_dict": timm.create_model("test_resnet").state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_file(path)


def test_extract_state_dict_layouts():
    sd = {"w": torch.ones(2), "b": torch.zeros(1)}
    ddp = {f"module.{k}": v for k, v in sd.items()}
    assert list(extract_state_dict(sd)) == ["w", "b"]
    assert list(extract_state_dict({"state_dict": ddp})) == ["w", "b"]
    assert list(extract_state_dict({"model": sd, "epoch": 3})) == ["w", "b"]
    ema = {"w": torch.full((2,), 5.0), "b": torch.zeros(1)}
    assert extract_state_dict({"state_dict": sd, "state_dict_ema": ema}, use_ema=True)["w"][0] == 5
    assert extract_state_dict({"state_dict": sd, "state_dict_ema": ema}, use_ema=False)["w"][0] == 1
    with pytest.raises(UserError, match="no model weights"):
        extract_state_dict({"epoch": 3, "args": {}})
    with pytest.raises(UserError, match="does not hold a state_dict"):
        extract_state_dict([1, 2])


def test_load_weights_accepts_safetensors_and_module_prefix(tmp_path):
    from safetensors.torch import save_file
    src = timm.create_model("test_resnet", num_classes=4)
    dst = timm.create_model("test_resnet", num_classes=4)
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"))
    load_weights(dst, tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pth")
    load_weights(timm.create_model("test_resnet", num_classes=4), tmp_path / "ddp.pth")


def test_load_weights_explains_head_and_architecture_mismatch(tmp_path):
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), tmp_path / "r4.pth")
    with pytest.raises(UserError, match="4-class head but the teacher is built with 7 classes"):
        load_weights(timm.create_model("test_resnet", num_classes=7), tmp_path / "r4.pth", what="teacher")
    with pytest.raises(UserError, match="does not fit architecture test_vit"):
        load_weights(timm.create_model("test_vit", num_classes=4), tmp_path / "r4.pth")


def test_plain_makes_weights_only_loadable(tmp_path):
    import argparse
    from pathlib import Path
    ns = argparse.Namespace(path=Path("/x"), sizes=(1, 2), opt=None, nested={"k": [1.5, "a"]})
    atomic_save({"args": plain(vars(ns))}, tmp_path / "a.pth")
    args = torch.load(tmp_path / "a.pth", weights_only=True)["args"]
    assert args == {"path": "/x", "sizes": [1, 2], "opt": None, "nested": {"k": [1.5, "a"]}}
    assert pickle.loads(pickle.dumps(args)) == args
