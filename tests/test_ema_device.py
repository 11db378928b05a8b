"""``--model-ema-force-cpu``: an EMA kept on another device than its student is not evaluated (timm's rule),
one on the student's device is."""
from __future__ import annotations

import timm
import torch

from conftest import make_student
from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.distributed import DistInfo
from vanillakd.engine import FitPlan, _evaluate_and_save, evaluated_with
from vanillakd.precision import Precision

CPU = torch.device("cpu")


def test_an_ema_is_evaluated_only_on_its_students_device():
    student = torch.nn.Linear(2, 2)
    assert evaluated_with(torch.nn.Linear(2, 2), student)
    assert not evaluated_with(torch.nn.Linear(2, 2, device="meta"), student)


def _student(tmp_path, *flags):
    args = build_train_parser("t", "").parse_args(["x", "--model", "test_resnet", "--workers", "0", "--output",
                                                   str(tmp_path), "--model-ema", *flags])
    cfg = run_config(args)
    st = make_student(cfg, 4, tmp_path / "s", device=CPU, updates_per_epoch=2)
    return st, cfg


def _eval(st, cfg):
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    row = {"epoch": 0}
    plan = FitPlan(cfg, DistInfo(), Precision.create(CPU, False), [st], None, None, batches)
    _evaluate_and_save(st, 0, cfg, row, plan, do_eval=True, teacher_preds=None)
    return row


def test_force_cpu_ema_beside_a_cpu_student_is_evaluated(tmp_path):
    st, cfg = _student(tmp_path, "--model-ema-force-cpu")
    row = _eval(st, cfg)
    assert "ema_top1" in row and (st.out_dir / "model_best_ema.pth.tar").is_file()
    st.close()


def test_ema_on_another_device_is_not_evaluated(tmp_path):
    """As on a GPU run with --model-ema-force-cpu: the batches are on the student's device, the EMA is not (the
    meta device stands in for the CPU here, the CPU for the GPU)."""
    st, cfg = _student(tmp_path, "--model-ema-force-cpu")
    st.emas[0].module = timm.create_model("test_resnet", num_classes=4).to("meta")
    row = _eval(st, cfg)
    assert "eval_top1" in row and not any(k.startswith("ema") for k in row)
    assert (st.out_dir / "last.pth.tar").is_file() and not (st.out_dir / "model_best_ema.pth.tar").exists()
    st.close()
