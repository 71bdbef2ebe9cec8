"""Typed run configs: every LoRA option is a flag and a YAML key of `train` and `train-sd`, values are converted to
their field types, and every bad value, unknown key or bad file is one `lorakit: error:` line with exit code 2."""

import subprocess
import sys

import pytest
import yaml

from lorakit import LoraConfig, LoraError, options
from lorakit.cli import main
from lorakit.llm import train as llm_train
from lorakit.llm.train import TrainConfig
from lorakit.sd import train as sd_train
from lorakit.sd.train import SDTrainConfig


@pytest.fixture
def seen(monkeypatch):
    """The config each trainer would have been given (nothing trains)."""
    got = {}
    monkeypatch.setattr(llm_train, "train", lambda cfg: got.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(sd_train, "train_sd", lambda cfg: got.setdefault("cfg", cfg) and {})
    return got


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_yaml_values_take_their_field_types(tmp_path, seen, capsys):
    (tmp_path / "run.yaml").write_text("lr: 1e-4\nmax_steps: null\nepochs: 2\nresume: yes\ntargets: q_proj,v_proj\n"
                                       "lora:\n  r: 4\n  use_rslora: true\n  rank_pattern: {q_proj: 16}\n")
    assert run(["train", "--config", str(tmp_path / "run.yaml")], capsys)[0] == 0
    cfg = seen["cfg"]
    assert (cfg.lr, cfg.max_steps, cfg.epochs, cfg.resume) == (1e-4, None, 2.0, True)
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, float)
    assert cfg.lora == LoraConfig(r=4, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"], use_rslora=True,
                                  rank_pattern={"q_proj": 16})


@pytest.mark.parametrize("command", ["train", "train-sd"])
def test_every_lora_option_is_a_flag(command, seen, capsys):
    argv = [command, "--r", "6", "--alpha", "3", "--dropout", "0.1", "--targets", "to_q", "--targets", "to_v",
            "--exclude", ".*attn1.*", "--rank-pattern", "{to_q: 2}", "--alpha-pattern", "{to_v: 1.5}", "--use-rslora",
            "--init", "gaussian", "--bias", "lora_only", "--modules-to-save", "head"]
    assert run(argv, capsys)[0] == 0
    assert seen["cfg"].lora == LoraConfig(r=6, alpha=3.0, dropout=0.1, targets=["to_q", "to_v"], exclude=".*attn1.*",
                                          rank_pattern={"to_q": 2}, alpha_pattern={"to_v": 1.5}, use_rslora=True,
                                          init="gaussian", bias="lora_only", modules_to_save=["head"])
    fields = {f for f in LoraConfig.__dataclass_fields__}
    assert fields <= set(options.fields(TrainConfig)) and fields <= set(options.fields(SDTrainConfig))


def test_booleans_have_no_forms_and_flags_win_over_yaml(tmp_path, seen, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"center_crop": True, "random_flip": True, "lr": 0.5,
                                                       "validation_prompts": ["a", "b"]}))
    argv = ["train-sd", "--config", str(tmp_path / "run.yaml"), "--no-center-crop", "--lr", "3e-4",
            "--validation-prompts", "a dog, on a bike", "--export", "kohya", "--export", "peft", "--snr-gamma", "none"]
    assert run(argv, capsys)[0] == 0
    cfg = seen["cfg"]
    assert (cfg.center_crop, cfg.random_flip, cfg.lr, cfg.snr_gamma) == (False, True, 3e-4, None)
    assert cfg.validation_prompts == ["a dog, on a bike"] and cfg.export == ["kohya", "peft"]


@pytest.mark.parametrize("argv, yaml_text, says", [
    (["--lr", "abc"], None, "--lr: expected a number, got 'abc'"),
    (["--max-steps", "1.5"], None, "--max-steps: expected an integer or null, got '1.5'"),
    (["--schedule", "bogus"], None, "invalid choice: 'bogus'"),
    (["--r", "0"], None, "LoraConfig.r must be a positive integer"),
    (["--rank-pattern", "[1, 2]"], None, "--rank-pattern: expected a mapping of string to integer"),
    ([], "lr: fast\n", "key 'lr': expected a number, got 'fast'"),
    ([], "lerning_rate: 1\n", "unknown key 'lerning_rate'"),
    ([], "- lr\n- 1\n", "holds a list; a config is a mapping"),
    ([], "lr: [1\n", "is not valid YAML"),
    ([], "lora: {r: two}\n", "key 'r': expected an integer, got 'two'"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, seen, capsys, argv, yaml_text, says):
    if yaml_text is not None:
        (tmp_path / "run.yaml").write_text(yaml_text)
        argv = ["--config", str(tmp_path / "run.yaml"), *argv]
    code, err = run(["train", *argv], capsys)
    assert code == 2 and "cfg" not in seen
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1 and says in err, err
    if yaml_text is not None and "unknown" not in says:
        assert str(tmp_path / "run.yaml") in err  # names the file


def test_a_missing_config_file_and_a_bad_flag_in_a_real_process(tmp_path):
    for argv, says in ((["--config", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"),
                       (["--lr", "abc"], "--lr: expected a number"), (["--bogus"], "unrecognized arguments: --bogus")):
        proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("lorakit: error: ") and says in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_python_configs_are_converted_and_checked_too():
    assert TrainConfig(lr="1e-4", max_steps="5").lr == 1e-4
    assert options.build(TrainConfig, r=4, targets="q_proj,v_proj").lora.targets == ["q_proj", "v_proj"]
    assert options.build(TrainConfig, targets="q_proj").lora.targets == ["q_proj"]  # a name, as --targets q_proj
    assert options.build(TrainConfig, targets=r".*\.q_proj").lora.targets == r".*\.q_proj"  # a pattern stays one
    with pytest.raises(LoraError, match="TrainConfig.precision: expected one of 'fp32', 'bf16', got 'fp64'"):
        TrainConfig(precision="fp64")
    with pytest.raises(LoraError, match="SDTrainConfig.lora: expected a LoraConfig"):
        SDTrainConfig(lora={"r": 4})
