"""``-c/--config FILE``: a YAML file of flag defaults goes through the parser exactly as the command line does
(types, ranges, choices, switches), is read safely (no aliases, no huge files), and a run's own args.yaml gives
the same run back."""
from __future__ import annotations

import time

import pytest
import yaml

from conftest import run_cli
from vanillakd.cli import train_kd
from vanillakd.cli.compare import load_grid
from vanillakd.cli.run_config import parse_run_config
from vanillakd.cli.train_args import build_train_parser, parse_train_args
from vanillakd.errors import UserError

DIR = "/nonexistent-data"  # parsing never looks at the data
BASE = [DIR, "--model", "test_resnet", "--teacher", "test_resnet"]


@pytest.fixture
def config(tmp_path):
    """write(text) -> the argv prefix ['-c', FILE] of a config file holding ``text``."""
    path = tmp_path / "cfg.yaml"

    def write(text: str) -> list[str]:
        path.write_text(text)
        return ["-c", str(path)]
    return write


def config_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as exc:
        parse_run_config(argv)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("--config "), text
    return text


@pytest.mark.parametrize("value,shown", [("'false'", "'false'"), ("1", "1"), ("[true]", "[True]"),
                                         ("null", "None"), ("on_please", "'on_please'")])
def test_a_switch_takes_yaml_booleans_only(config, value, shown):
    text = config_error(config(f"trust_checkpoint: {value}\n") + BASE)
    assert f"bad value for trust_checkpoint: a switch takes true or false, got {shown}" in text


def test_switches_on_off_and_auto(config):
    flags = parse_run_config(config("trust_checkpoint: false\nmodel_ema: true\namp: false\nchannels_last: true\n"
                                    "pin_mem: null\nfused_opt: false\nprogress: false\n") + BASE).flags
    assert (flags["trust_checkpoint"], flags["model_ema"], flags["amp"], flags["channels_last"]) == \
        (False, True, False, True)
    assert flags["pin_mem"] is None and flags["fused_opt"] is False and flags["progress"] is False
    assert parse_run_config(config("progress: null\namp: true\n") + BASE).flags["progress"] is None
    # explicit flags win over the file, the --no- forms too
    flags = parse_run_config(config("amp: true\nprogress: true\nmodel_ema: true\n") + BASE + ["--no-amp"]).flags
    assert flags["amp"] is False and flags["progress"] is True
    assert "a switch takes true or false, got 'no'" in config_error(config("amp: 'no'\n") + BASE)


@pytest.mark.parametrize("text,message", [
    ("eval_metric: top3\n", "bad value for eval_metric: argument --eval-metric: invalid choice: 'top3'"),
    ("kd-loss-weight: .nan\n", "bad value for kd-loss-weight: argument --kd-loss-weight: must be a finite number"),
    ("lr: [0.1, .inf]\n", "bad value for lr: argument --lr: must be a finite number, got inf"),
    ("smoothing: 1.5\n", "argument --smoothing: must be in [0, 1), got 1.5"),
    ("scale: [0.1, 0.5, 0.9]\n", "bad value for scale: takes 2 values, got 3"),
    ("seed: -1\n", "argument --seed: must be in [0, 2147483647], got -1"),
    ("epochs: true\n", "bad value for epochs: takes a value, not true/false"),
    ("aa: false\n", "bad value for aa: takes a value, not true/false"),
    ("aa: {policy: rand}\n", "bad value for aa: a nested mapping is not a flag value"),
    ("model: [test_resnet, {x: 1}]\n", "bad value for model: takes values, not a nested dict"),
    ("epochs: null\n", "bad value for epochs: null is only for flags whose default is none"),
    ("lr: [null]\n", "bad value for lr: null is only for flags whose default is none"),
    ("experiment: [a, b]\n", "bad value for experiment: takes one value, got a list of 2"),
    ("remode: pixels\n", "argument --remode: invalid choice: 'pixels'"),
    ("temperature: .inf\n", "argument --temperature: must be a finite number, got inf"),
    ("nce_mom: 1.5\n", "argument --nce-mom: must be in [0, 1], got 1.5"),
])
def test_values_are_parsed_as_on_the_command_line(config, text, message):
    assert message in config_error(config(text) + BASE)


def test_values_that_the_command_line_takes_are_taken(config):
    cfg = parse_run_config(config(
        "lr: [0.1, 0.2]\nkd-loss: dkd\nclip_grad: [null]\ndrop_path: [null]\nmean: null\nweight_decay: 2.0e-05\n"
        "mean: [-1.0e-05, 0.5, 0.5]\nremode: const\nepochs: 3\ndecay_epochs: 100\nexperiment: -odd-name\n"
        "opt_betas: [0.9, 0.999]\nnce_mom: 0\n".replace("mean: null\n", "")) + BASE)
    f = cfg.flags
    assert f["lr"] == [0.1, 0.2] and f["kd_loss"] == ["dkd"] and f["clip_grad"] == [None]
    assert f["drop_path"] == [None] and f["weight_decay"] == [2e-05] and f["mean"] == [-1e-05, 0.5, 0.5]
    assert f["epochs"] == 3 and f["experiment"] == "-odd-name" and f["opt_betas"] == [0.9, 0.999]
    assert len(cfg.students) == 2 and f["nce_mom"] == 0.0
    assert "bad value for mean: null" not in str(parse_run_config(config("mean: null\n") + BASE).flags)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef")) + "model: *f\n"


@pytest.mark.parametrize("text", [BOMB, "model: &m [test_resnet]\nteacher: *m\n",
                                  "base: &b {lr: 0.1}\n<<: *b\n", "lr: &x 0.1\n"])
def test_anchors_and_aliases_are_refused_before_expansion(config, text):
    start = time.monotonic()
    message = config_error(config(text) + BASE)
    assert "is not valid YAML: anchors and aliases (&name, *name) are not accepted (line 1" in message
    assert time.monotonic() - start < 2


def test_big_files_duplicate_keys_and_bad_yaml_are_one_line(config, tmp_path):
    assert "larger than 1024 KiB" in config_error(config("# padding\n" * 120_000) + BASE)
    assert "key 'epochs' is given twice (line 2" in config_error(config("epochs: 1\nepochs: 2\n") + BASE)
    assert "must be a mapping of flag names" in config_error(config("- lr\n") + BASE)
    assert "keys are flag names, got 3" in config_error(config("3: lr\n") + BASE)
    assert "is not valid YAML: " in config_error(config("lr: [0.1\n") + BASE)
    assert "unknown key 'epochz'" in config_error(config("epochz: 1\n") + BASE)
    with pytest.raises(UserError, match="cannot read --config"):
        parse_run_config(["-c", str(tmp_path / "missing.yaml")] + BASE)


def test_data_dir_from_the_file_and_the_command_line_wins(config, capsys):
    argv = config(f"data_dir: {DIR}\nepochs: 2\n")
    assert parse_run_config(argv + ["--model", "test_resnet"]).data.data_dir == DIR
    assert parse_run_config(argv + ["/elsewhere", "--model", "test_resnet"]).data.data_dir == "/elsewhere"
    assert "bad value for data_dir: must be a non-empty string" in config_error(config("data_dir: 3\n") + BASE)
    with pytest.raises(SystemExit) as exc:
        parse_run_config(config("epochs: 2\n") + ["--model", "test_resnet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().endswith("required: DIR") and len(err.strip().splitlines()) == 1


def test_a_required_flag_may_come_from_the_file(config):
    # cache-teacher's --cache-dir is required; its own run records may hold it
    parser = build_train_parser("vanillakd cache-teacher", "")
    parser.add_argument("--cache-dir", required=True)
    args = parse_train_args(parser, config("cache_dir: /tmp/cache\n") + BASE)
    assert args.cache_dir == "/tmp/cache"
    assert all(a.required is False for a in parser._actions if a.dest == "cache_dir")
    fresh = build_train_parser("vanillakd cache-teacher", "")
    fresh.add_argument("--cache-dir", required=True)
    with pytest.raises(SystemExit):
        parse_train_args(fresh, config("epochs: 2\n") + BASE)
    # a file whose value fails leaves the parser as it was: argparse's own error, nothing made optional
    with pytest.raises(UserError, match="argument --epochs: must be > 0"):
        parse_train_args(fresh, config("epochs: 0\n") + BASE)
    assert "error" not in vars(fresh) and all(a.required for a in fresh._actions if a.dest in ("cache_dir", "data_dir"))


def test_the_config_error_reaches_the_user_as_one_line(config, capsys, tmp_path):
    argv = config("trust_checkpoint: 'false'\n") + [tmp_path / "no-data", "--model", "test_resnet", "--teacher",
                                                      "test_resnet", "--workers", "0", "--output", tmp_path]
    assert run_cli(train_kd.cli, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train-kd.py: error: --config ") and len(err.splitlines()) == 1
    assert "trust_checkpoint: a switch takes true or false, got 'false'" in err


def test_a_runs_args_yaml_gives_the_same_run_back(tiny_data, teacher_ckpt, tmp_path):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--lr", "0.01", "0.02", "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0",
            "--warmup-epochs", "0", "--scale", "0.5", "1", "--weight-decay", "2e-5", "--output", tmp_path,
            "--experiment", "rt", "--no-progress", "--max-train-steps", "1"]
    assert run_cli(train_kd.cli, argv) == 0
    run = tmp_path / "rt"
    files = [run / "args.yaml"] + sorted(run.glob("student*/args.yaml"))
    assert len(files) == 3
    for path in files:
        recorded = yaml.safe_load(path.read_text())
        cfg = parse_run_config(["-c", str(path)])
        again = dict(cfg.flags)
        assert again.pop("config") == str(path)
        assert {k: v for k, v in recorded.items() if k not in ("config", "train_images")} == \
            {k: v for k, v in again.items()}, path
        assert len(cfg.students) == (2 if path.parent == run else 1)
    # and explicit flags still win over the file
    cfg = parse_run_config(["-c", str(files[1]), "--epochs", "4", "--lr", "0.5"])
    assert cfg.flags["epochs"] == 4 and cfg.flags["lr"] == [0.5] and cfg.flags["data_dir"] == str(tiny_data)


def test_compare_grid_is_read_safely_and_parsed_as_compare_flags(tmp_path):
    grid = tmp_path / "grid.yaml"
    head = "data_dir: /data\nmodel: test_resnet\nteacher: t\nteacher_pretrained: t.pth\n"
    for text, message in [
        (head + "seeds: &s [0, 1]\n", "anchors and aliases"),
        (head + "seeds: [x]\n", "bad value for seeds: argument --seeds: invalid int value: 'x'"),
        (head + "seeds: [-1]\n", "argument --seeds: must be in [0, 2147483647], got -1"),
        (head + "fractions: [0.5, .nan]\n", "argument --fractions: must be a finite number, got nan"),
        (head + "train_teacher_epochs: 0\n", "argument --train-teacher-epochs: must be > 0"),
        (head + "dataset_download: 'yes'\n", "a switch takes true or false"),
        (head + "recipe: --epochs 3\n", "recipe must be a list of train-kd arguments"),
        (head + "methods: [kd, {x: 1}]\n", "methods must be a list of method names"),
    ]:
        grid.write_text(text)
        with pytest.raises(UserError) as exc:
            load_grid(["-c", str(grid)])
        assert message in str(exc.value) and "\n" not in str(exc.value), (text, exc.value)
    grid.write_text(head + "methods: kd\nfractions: [0.5]\nseeds: [3]\n")
    g, _ = load_grid(["-c", str(grid), "--seeds", "5"])
    assert g["methods"] == ["kd"] and g["fractions"] == [0.5] and g["seeds"] == [5]


@pytest.mark.parametrize("text,message", [
    ("~: 2\n", "keys are flag names, got None"),
    ("[" * 5000, "nests too deeply"),
    ("kd-loss: [dkd]\nkd_loss: [kd]\n", "is given twice (as '-' and '_' spellings)"),
])
def test_null_keys_deep_nesting_and_two_spellings_are_one_line(config, text, message):
    assert message in config_error(config(text) + BASE)


@pytest.mark.parametrize("text", ["seeds: null\n", "fractions: []\n", "output: null\n"])
def test_compare_grid_keys_without_a_value_are_refused(tmp_path, text):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    with pytest.raises(UserError, match="has no value"):
        load_grid([str(tmp_path), "-c", str(grid)])
