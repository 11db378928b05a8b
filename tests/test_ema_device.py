"""``--model-ema-force-cpu``: an EMA kept on another device than its student is not evaluated (timm's rule),
one on the student's device is."""
from __future__ import annotations

import timm
import torch

from vanillakd.cli.train_args import build_train_parser
from vanillakd.engine import evaluated_with
from vanillakd.precision import Precision
from vanillakd.student import StudentRun, student_settings
from vanillakd.train import _evaluate_and_save

CPU = torch.device("cpu")


def test_an_ema_is_evaluated_only_on_its_students_device():
    student = torch.nn.Linear(2, 2)
    assert evaluated_with(torch.nn.Linear(2, 2), student)
    assert not evaluated_with(torch.nn.Linear(2, 2, device="meta"), student)


def _student(tmp_path, *flags):
    args = build_train_parser("t", "").parse_args(["x", "--model", "test_resnet", "--workers", "0", "--output",
                                                   str(tmp_path), "--model-ema", *flags])
    st = StudentRun(0, student_settings(args)[0], args, 4, CPU, Precision.create(CPU, False), updates_per_epoch=2,
                    out_dir=tmp_path / "s")
    return st, args


def _eval(st, args):
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    row = {"epoch": 0}
    _evaluate_and_save(st, 0, args, row, batches, Precision.create(CPU, False), do_eval=True)
    return row


def test_force_cpu_ema_beside_a_cpu_student_is_evaluated(tmp_path):
    st, args = _student(tmp_path, "--model-ema-force-cpu")
    row = _eval(st, args)
    assert "ema_top1" in row and (st.out_dir / "model_best_ema.pth.tar").is_file()
    st.close()


def test_ema_on_another_device_is_not_evaluated(tmp_path):
    """As on a GPU run with --model-ema-force-cpu: the batches are on the student's device, the EMA is not (the
    meta device stands in for the CPU here, the CPU for the GPU)."""
    st, args = _student(tmp_path, "--model-ema-force-cpu")
    st.emas[0].module = timm.create_model("test_resnet", num_classes=4).to("meta")
    row = _eval(st, args)
    assert "eval_top1" in row and not any(k.startswith("ema") for k in row)
    assert (st.out_dir / "last.pth.tar").is_file() and not (st.out_dir / "model_best_ema.pth.tar").exists()
    st.close()
