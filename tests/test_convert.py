"""`lorakit convert`: any format to any writable one and back, bit-exact in every factor and alpha."""

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig, LoraError
from lorakit.cli import main


@pytest.fixture
def sd_adapter(tiny_sd, tmp_path):
    """A lorakit file for the tiny SD pipeline: mixed ranks and alphas, a LoCon 3x3 conv, the text encoder."""
    lorakit.inject(tiny_sd, LoraConfig(r=4, alpha=4, targets=["to_q", "to_v", "proj_in", "resnets.0.conv1", "q_proj"],
                                       rank_pattern={"to_v": 2}, alpha_pattern={"attn2.to_q": 3, "q_proj": 1.5}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lorakit.core.components.as_module(tiny_sd).named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return lorakit.save(tiny_sd, tmp_path / "a.safetensors")


def same(a, b):
    assert set(a.modules) == set(b.modules)
    for path, m in a.modules.items():
        n = b.modules[path]
        assert torch.equal(m.A, n.A) and torch.equal(m.B, n.B) and m.alpha == n.alpha, path


@pytest.mark.parametrize("chain", [["peft"], ["diffusers"], ["kohya"], ["diffusers", "kohya", "peft", "diffusers"]])
def test_round_trips_are_bit_exact(sd_adapter, tmp_path, chain, capsys):
    src = sd_adapter
    for i, fmt in enumerate([*chain, "lorakit"]):
        dest = tmp_path / f"{i}-{fmt}" if fmt == "peft" else tmp_path / f"{i}-{fmt}.safetensors"
        assert main(["convert", str(src), str(dest), "--to", fmt]) == 0
        src = dest
        assert lorakit.read(src)[1] == fmt
    back = lorakit.read(src)[0]
    ours = lorakit.read(sd_adapter)[0]
    # kohya restores the `text_model.` segment A1111 expects; lorakit maps it back when loading
    back.modules = {p.replace("text_model.", ""): m for p, m in back.modules.items()}
    same(ours, back)


def test_unknown_file_lists_every_format(tmp_path, capsys):
    save_file({"weight": torch.ones(2)}, tmp_path / "x.safetensors")
    assert main(["inspect", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    for name in ("lorakit", "PEFT", "diffusers", "kohya", "lycoris", "cloneofsimo", "loralib"):
        assert name in err


def test_inspect_shows_kohya_header(sd_adapter, tmp_path, capsys):
    lorakit.formats.io.convert(sd_adapter, tmp_path / "k.safetensors", "kohya")
    assert main(["inspect", str(tmp_path / "k.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format:      kohya" in out and "ss_network_dim" in out and "sshs_model_hash" in out


def test_cloneofsimo_files_need_their_model_to_convert(tmp_path):
    save_file({"unet:0:up": torch.ones(4, 1), "unet:0:down": torch.ones(1, 4)}, tmp_path / "c.safetensors")
    with pytest.raises(LoraError, match="traversal order"):
        lorakit.formats.io.convert(tmp_path / "c.safetensors", tmp_path / "out.safetensors", "kohya")
