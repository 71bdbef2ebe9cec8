"""lorakit.analysis: the LoRA paper's §7 quantities on constructed adapters with known answers, and `lorakit analyze`."""

import json
import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.analysis import analyze, phi, spectrum
from lorakit.cli import main
from lorakit.formats.adapter import Adapter, ModuleLora
from lorakit.llm import pretrained


def orthonormal(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]  # n x k, orthonormal columns


def lora(A, B=None, alpha=None):
    B = torch.randn(5, A.shape[0], dtype=torch.float64) if B is None else B
    return ModuleLora(A, B, alpha or A.shape[0], "linear")


def test_phi_is_one_where_the_top_directions_are_shared():
    """A1 and A2 share their top k = 2 right-singular directions in the same order, then go separate ways: φ(i, j) = 1
    whenever min(i, j) ≤ k (the smaller top set lies inside the larger); A2 = Q·A1 spans A1's rows: φ(i, r2) = 1."""
    E = orthonormal(12, 8).T  # 8 orthonormal rows
    A1 = torch.diag(torch.tensor([9.0, 7, 3, 2], dtype=torch.float64)) @ E[[0, 1, 2, 3]]
    A2 = torch.diag(torch.tensor([8.0, 6, 5, 4, 1, 0.5], dtype=torch.float64)) @ E[[0, 1, 4, 5, 6, 7]]
    f = phi(A1, A2)
    assert f.shape == (4, 6)
    for i in range(1, 5):
        for j in range(1, 7):
            if min(i, j) <= 2:
                assert f[i - 1, j - 1] == pytest.approx(1, abs=1e-12), (i, j)
            else:  # the extra directions are orthogonal: only the 2 shared ones count
                assert f[i - 1, j - 1] == pytest.approx(2 / min(i, j), abs=1e-12), (i, j)
    Q = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = phi(A1, Q @ A1)
    assert torch.allclose(g[:, -1], torch.ones(4, dtype=torch.float64)) and torch.allclose(g[-1], g.new_ones(4))
    assert ((g >= -1e-12) & (g <= 1 + 1e-12)).all()


def test_phi_is_zero_for_orthogonal_row_spaces_and_cos2_at_an_angle():
    E = orthonormal(10, 6).T
    assert phi(E[:3] * 2, E[3:] * torch.tensor([[3.0], [2], [1]], dtype=torch.float64)).abs().max() < 1e-12
    theta = 0.3
    e1, e2 = E[0], E[1]
    f = phi(e1[None], (math.cos(theta) * e1 + math.sin(theta) * e2)[None])
    assert float(f[0, 0]) == pytest.approx(math.cos(theta) ** 2, abs=1e-12)


@pytest.mark.parametrize("rslora", [False, True])
def test_singular_values_and_frobenius_of_the_scaled_update(rslora):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(6, 3, generator=g)
    a = Adapter({"m": ModuleLora(A, B, 5.0, "linear")}, use_rslora=rslora)
    s = 5 / math.sqrt(3) if rslora else 5 / 3
    got = analyze(a)["modules"]["m"]
    want = torch.linalg.svdvals(s * B.double() @ A.double())[:3]
    assert got["r"] == 3 and torch.allclose(torch.tensor(got["singular_values"], dtype=torch.float64), want)
    assert got["frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(s * B.double() @ A.double())))


def test_effective_rank_and_energy_90_on_a_known_spectrum():
    flat = spectrum(torch.ones(4))
    assert flat["effective_rank"] == pytest.approx(4) and flat["energy_90"] == 4
    one = spectrum(torch.tensor([3.0, 0, 0]))
    assert one["effective_rank"] == pytest.approx(1) and one["energy_90"] == 1
    s = torch.tensor([3.0, 1.0])  # σ² shares 0.9 and 0.1: 90 % reached at k = 1; p = (0.75, 0.25)
    got = spectrum(s)
    assert got["energy_90"] == 1 and got["frobenius"] == pytest.approx(math.sqrt(10))
    assert got["effective_rank"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert spectrum(torch.tensor([2.0, 1.0]))["energy_90"] == 2  # 0.8 < 0.9
    assert spectrum(torch.zeros(3)) == {"effective_rank": 0.0, "energy_90": 0, "frobenius": 0.0}


def test_amplification_against_explicit_svds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7))
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, 9, generator=g), torch.randn(7, 2, generator=g)
    got = analyze(Adapter({"0": ModuleLora(A, B, 4.0, "linear")}), base=model)["modules"]["0"]
    D = 2 * B.double() @ A.double()
    U, _, Vh = torch.linalg.svd(D)
    W = model[0].weight.detach().double()
    proj = torch.linalg.matrix_norm(U[:, :2].T @ W @ Vh[:2].T)
    Uw, _, Vwh = torch.linalg.svd(W)
    assert got["w_proj_dw"] == pytest.approx(float(proj))
    assert got["amplification"] == pytest.approx(float(torch.linalg.matrix_norm(D) / proj))
    assert got["w_proj_w"] == pytest.approx(float(torch.linalg.matrix_norm(Uw[:, :2].T @ W @ Vwh[:2].T)))
    assert got["w_frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(W)))
    assert 0 < got["w_proj_random"] < got["w_proj_w"]


def test_conv_modules_are_flattened():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    got = analyze(Adapter({"0": ModuleLora(A, B, 2.0, "conv")}), vs=Adapter({"0": ModuleLora(A, B, 2.0, "conv")}),
                  base=conv)["modules"]["0"]
    assert torch.allclose(torch.tensor(got["singular_values"], dtype=torch.float64),
                          torch.linalg.svdvals(B.flatten(1).double() @ A.flatten(1).double())[:2])
    assert got["phi_top"] == pytest.approx(1) and got["w_frobenius"] == pytest.approx(float(conv[0].weight.detach().norm()))


@pytest.fixture
def tiny_adapters(save_tiny, tmp_path):
    base = save_tiny(tmp_path / "base")
    files = []
    for r in (2, 4):
        model = pretrained.load(str(base))[0]
        lorakit.inject(model, LoraConfig(r=r, alpha=2 * r, targets=["q_proj", "v_proj"], init=False))
        files.append(lorakit.save(model, tmp_path / f"r{r}.safetensors", base_model=str(base)))
    return base, files


def test_cli_writes_json_and_plots(tiny_adapters, tmp_path, capsys):
    base, (r2, r4) = tiny_adapters
    out = tmp_path / "analysis"
    assert main(["analyze", str(r2), "--vs", str(r4), "--base", str(base), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "effective rank" in printed and "φ(1,1)" in printed and "amplification" in printed
    mods = json.loads((out / "analysis.json").read_text())["modules"]
    assert set(mods) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    for m in mods.values():
        assert m["r"] == 2 and len(m["phi"]) == 2 and len(m["phi"][0]) == 4 and m["amplification"] > 0
        assert {"singular_values", "effective_rank", "energy_90", "frobenius", "phi_top", "w_proj_dw", "w_proj_w",
                "w_proj_random", "w_frobenius"} <= set(m)
    for name in ("spectra.png", "phi.png", "amplification.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", str(r4), "--out", str(tmp_path / "alone")]) == 0
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == ["analysis.json", "spectra.png"]


def test_cli_bad_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["analyze", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit: error:")
    assert not (tmp_path / "o").exists()
