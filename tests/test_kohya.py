"""kohya / A1111 LoRA files and LyCORIS LoHa/LoKr: lorakit writes what kohya writes, reads it back bit-exactly, maps
SDXL's SGM names, applies every module's own alpha (which diffusers 0.42.1 does not), and refuses bad files without
touching the model."""

import copy
import hashlib
import json
import math
import struct

import pytest
import torch
from conftest import tiny_unet
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig, LoraError, ModuleLora
from lorakit.core.components import as_module
from lorakit.formats.adapter import Adapter, from_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "down_blocks.1.resnets.0.conv1",
           "q_proj", "k_proj", "v_proj", "out_proj"]
ATTN = "down_blocks_0_attentions_0_transformer_blocks_0"
CONV1 = "unet.down_blocks.1.resnets.0.conv1"
Q = f"lora_unet_{ATTN}_attn1_to_q"  # Linear 8 -> 8
C = "lora_unet_down_blocks_1_resnets_0_conv1"  # Conv2d 8 -> 16, 3x3


def randomize(*models):
    """Give every LoRA factor random values (B starts at zero, which would hide mistakes)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in models:
            for n, p in model.named_parameters():
                if ".lora_A." in n or ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def unet_out(unet):
    """The UNet's output on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=ctx).sample


def outputs(pipe):
    """UNet and text-encoder outputs on fixed inputs."""
    with torch.no_grad():
        return unet_out(pipe.unet), pipe.text_encoder(torch.tensor([[53, 3, 7, 54]]))[0]


def adapted(pipe, **patterns):
    """The pipeline with a lorakit adapter on UNet attention, SD1's 1x1-conv proj_in, a 3x3 resnet conv (LoCon) and
    the text encoder's attention, with per-module ranks and alphas unless told otherwise."""
    patterns = patterns or dict(rank_pattern={"to_v": 2, "conv1": 3},
                                alpha_pattern={"attn2.to_k": 3, "q_proj": 6, "conv1": 2.5, "proj_in": 0.1})
    lorakit.inject(pipe, LoraConfig(r=4, alpha=4, targets=TARGETS, **patterns))
    randomize(pipe.unet, pipe.text_encoder)
    return pipe


def snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def delta(ml: ModuleLora) -> torch.Tensor:
    """scale·B·A of a canonical module, as (out, in·kh·kw)."""
    return (ml.B.flatten(1).double() @ ml.A.flatten(1).double()) * ml.alpha / ml.r


def with_delta(module, dw):
    """Add ΔW (any layout with the weight's element count) to a module's weight, in place."""
    with torch.no_grad():
        module.weight += dw.reshape(module.weight.shape).to(module.weight.dtype)


# --- lorakit -> kohya -> lorakit ---------------------------------------------------------------------
def test_round_trip_through_kohya_is_bit_exact(tiny_sd, tmp_path):
    pipe = adapted(tiny_sd)
    path = lorakit.save(pipe, tmp_path / "a.safetensors", format="kohya")
    back, fmt = lorakit.read(path)
    ours = from_model(as_module(pipe), "default")
    assert fmt == "kohya"
    # transformers 5's CLIPTextModel has no text_model; the file (as A1111 wants) has it
    assert {p.replace("text_encoder.text_model.", "text_encoder.") for p in back.modules} == set(ours.modules)
    assert any(m.kind == "conv" for m in back.modules.values())  # the 3x3 LoCon module
    for path_, m in ours.modules.items():
        b = back.modules[path_.replace("text_encoder.", "text_encoder.text_model.")]
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B) and b.alpha == m.alpha, path_
    fresh = copy.deepcopy(pipe)
    lorakit.unload(fresh, merge=False)
    lorakit.load(fresh, path)
    for x, y in zip(outputs(fresh), outputs(pipe)):
        assert torch.equal(x, y)


def test_keys_and_metadata_look_like_kohyas(tiny_sd, tmp_path):
    path = lorakit.save(adapted(tiny_sd), tmp_path / "a.safetensors", format="kohya")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        down = f.get_tensor(f"lora_unet_{ATTN}_attn1_to_q.lora_down.weight")
        alpha = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha")
        proj_up = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight")
        conv_down = f.get_tensor("lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight")
    assert {f"lora_unet_{ATTN}_attn1_to_q.lora_up.weight", f"lora_unet_{ATTN}_attn2_to_out_0.alpha",
            "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight"} <= keys
    assert down.shape == (4, 8) and proj_up.shape == (8, 4, 1, 1) and conv_down.shape == (3, 8, 3, 3)
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == 6
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"  # per-module ranks and alphas
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "2.5"}
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("False", "sd_v1")
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert {"modelspec.implementation", "modelspec.title", "modelspec.date"} <= set(meta)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_uniform_adapter_records_its_dim_and_alpha_and_the_legacy_hash(tmp_path):
    g = torch.Generator().manual_seed(0)
    mods = {f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn{i}.to_q": ModuleLora(
        torch.randn(8, 20000, generator=g), torch.randn(16, 8, generator=g), 4) for i in (1, 2)}
    path = lorakit.formats.io.write(Adapter(mods, base_model="runwayml/sd15"), tmp_path / "big.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_network_args"]) == ("8", "4", "{}")
    assert meta["ss_sd_model_name"] == "runwayml/sd15"
    # sd-scripts' recipe: the file as written with only the ss_* metadata, 0x10000 bytes from offset 0x100000
    body = safetensors_bytes(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(body) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(body[0x100000:0x110000]).hexdigest()[:8]


def test_sdxl_adapters_get_te1_and_te2_prefixes_and_rslora_keeps_its_scale(tmp_path):
    m = lambda: ModuleLora(torch.randn(4, 16), torch.randn(16, 4), 8)  # noqa: E731
    a = Adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": m(),
                 "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": m(),
                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": m()}, use_rslora=True)
    path = lorakit.formats.io.write(a, tmp_path / "xl.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha"} <= keys
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    back, _ = lorakit.read(path)
    assert set(back.modules) == {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                                 "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
                                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"}
    for ml in back.modules.values():  # kohya's alpha/r equals the rsLoRA scale alpha/sqrt(r)
        assert not back.use_rslora and math.isclose(ml.alpha / ml.r, 8 / math.sqrt(4), rel_tol=1e-6)


def test_writing_refuses_what_kohya_files_cannot_hold(tmp_path):
    m = ModuleLora(torch.randn(4, 16), torch.randn(16, 4), 4)
    with pytest.raises(LoraError, match="pipeline"):
        lorakit.formats.io.write(Adapter({"layers.0.q_proj": m}), tmp_path / "x.safetensors", "kohya")
    with pytest.raises(LoraError, match="does not read back"):
        lorakit.formats.io.write(Adapter({"unet.my_block.q": m}), tmp_path / "x.safetensors", "kohya")
    with pytest.raises(LoraError, match="embedding"):
        lorakit.formats.io.write(Adapter({"text_encoder.embeddings.token_embedding": ModuleLora(m.A, m.B, 4, "embedding")}),
                         tmp_path / "x.safetensors", "kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_lone_unets_adapter_is_written_under_lora_unet(tmp_path):
    unet = tiny_unet()
    lorakit.inject(unet, LoraConfig(r=2, targets=["to_q"]))
    path = lorakit.save(unet, tmp_path / "u.safetensors", format="kohya")
    assert all(k.startswith("lora_unet_") for k in safe_open(str(path), "pt").keys())


def _pair(name=Q, r_down=4, r_up=4):
    return {f"{name}.lora_down.weight": torch.ones(r_down, 8) * 0.1,
            f"{name}.lora_up.weight": torch.ones(8, r_up) * 0.1}


# --- SDXL's SGM names ----------------------------------------------------------------------------
def sgm_blocks(unet) -> dict:
    """SGM block name -> diffusers module, found by walking the diffusers UNet in the SGM UNet's block order."""
    blocks, n = {"input_blocks_0_0": unet.conv_in}, 1
    for down in unet.down_blocks:
        for j, res in enumerate(down.resnets):
            blocks[f"input_blocks_{n}_0"] = res
            if getattr(down, "attentions", None):
                blocks[f"input_blocks_{n}_1"] = down.attentions[j]
            n += 1
        if down.downsamplers:
            blocks[f"input_blocks_{n}_0"] = down.downsamplers[0]
            n += 1
    mid = unet.mid_block
    blocks.update(middle_block_0=mid.resnets[0], middle_block_1=mid.attentions[0], middle_block_2=mid.resnets[1])
    n = 0
    for up in unet.up_blocks:
        for j, res in enumerate(up.resnets):
            blocks[f"output_blocks_{n}_0"] = res
            k = 1
            if getattr(up, "attentions", None):
                blocks[f"output_blocks_{n}_1"], k = up.attentions[j], 2
            if j == len(up.resnets) - 1 and up.upsamplers:
                blocks[f"output_blocks_{n}_{k}"] = up.upsamplers[0]
            n += 1
    return blocks


# SGM key tail -> (SGM block, the module inside the diffusers block)
SGM_KEYS = {
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": ("input_blocks_1_1", "transformer_blocks.0.attn1.to_q"),
    "input_blocks_2_1_proj_in": ("input_blocks_2_1", "proj_in"),
    "input_blocks_4_0_in_layers_2": ("input_blocks_4_0", "conv1"),
    "input_blocks_4_0_skip_connection": ("input_blocks_4_0", "conv_shortcut"),
    "input_blocks_3_0_op": ("input_blocks_3_0", "conv"),
    "middle_block_1_transformer_blocks_0_attn2_to_out_0": ("middle_block_1", "transformer_blocks.0.attn2.to_out.0"),
    "middle_block_2_emb_layers_1": ("middle_block_2", "time_emb_proj"),
    "output_blocks_2_1_conv": ("output_blocks_2_1", "conv"),
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": ("output_blocks_3_1", "transformer_blocks.0.ff.net.2"),
    "output_blocks_5_0_out_layers_3": ("output_blocks_5_0", "conv2"),
    "output_blocks_5_1_transformer_blocks_0_attn1_to_v": ("output_blocks_5_1", "transformer_blocks.0.attn1.to_v"),
    "input_blocks_0_0": ("input_blocks_0_0", ""),
}


def test_sdxl_sgm_names_load_onto_the_right_diffusers_modules(tmp_path):
    unet = tiny_unet(layers_per_block=2, linear_proj=True)
    blocks, names = sgm_blocks(unet), {id(m): n for n, m in unet.named_modules()}
    g, tensors, expected = torch.Generator().manual_seed(3), {}, {}
    for tail, (block, inner) in SGM_KEYS.items():
        path = ".".join(p for p in (names[id(blocks[block])], inner) if p)
        w = unet.get_submodule(path).weight
        A = torch.randn(2, *w.shape[1:], generator=g)
        B = torch.randn(w.shape[0], 2, *[1] * (w.dim() - 2), generator=g)
        tensors.update({f"lora_unet_{tail}.lora_down.weight": A, f"lora_unet_{tail}.lora_up.weight": B,
                        f"lora_unet_{tail}.alpha": torch.tensor(1.0)})
        expected[path] = (A, B)
    save_file(tensors, tmp_path / "xl.safetensors")
    a, _ = lorakit.read(tmp_path / "xl.safetensors")
    assert set(a.modules) == {f"unet.{p}" for p in expected}
    lorakit.load(unet, tmp_path / "xl.safetensors", name="xl")
    for path, (A, B) in expected.items():
        m = unet.get_submodule(path)
        assert isinstance(m, lorakit.LoraLayer) and torch.equal(m.lora_A["xl"], A) and m.lora_scale["xl"] == 0.5


@pytest.mark.parametrize("alpha, expected", [(None, 4.0), (0.0, 4.0), (torch.tensor(0.1), 0.1),
                                             (torch.tensor(0.1, dtype=torch.float16), 0.1), (torch.tensor(2.5), 2.5)])
def test_alpha_rules(tmp_path, alpha, expected):
    """A missing or 0 alpha means alpha = rank (kohya's rule); stored alphas read back as the decimal written."""
    alpha = torch.tensor(alpha) if isinstance(alpha, float) else alpha
    save_file(_pair() | ({} if alpha is None else {f"{Q}.alpha": alpha}), tmp_path / "a.safetensors")
    a, _ = lorakit.read(tmp_path / "a.safetensors")
    (ml,) = a.modules.values()
    assert ml.alpha == expected and ml.r == 4


# --- against diffusers 0.42.1 --------------------------------------------------------------------
def test_uniform_alpha_file_gives_diffusers_outputs(tiny_sd, tmp_path):
    base, theirs = copy.deepcopy(tiny_sd), copy.deepcopy(tiny_sd)
    pipe = adapted(tiny_sd, alpha_pattern={}, rank_pattern={})  # r=4, alpha=4 everywhere
    path = lorakit.save(pipe, tmp_path / "u.safetensors", format="kohya")
    lorakit.load(base, path)
    theirs.load_lora_weights(str(path))
    for ours, them, orig in zip(outputs(base), outputs(theirs), outputs(pipe)):
        assert torch.allclose(ours, them, atol=1e-5), (ours - them).abs().max()
        assert torch.equal(ours, orig)


def kohya_attention_file(unet, path, alphas: dict):
    """A hand-made kohya file on attention modules, rank 4, with the given alpha per module; returns ΔW per module."""
    g, tensors, deltas = torch.Generator().manual_seed(7), {}, {}
    for module, alpha in alphas.items():
        w = unet.get_submodule(module).weight
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 4, generator=g) * 0.3
        name = "lora_unet_" + module.replace(".", "_")
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(float(alpha))})
        deltas[module] = alpha / 4 * up.double() @ down.double()
    save_file(tensors, path)
    return deltas


def test_each_modules_own_alpha_is_applied_which_diffusers_0_42_does_not(tiny_sd, tmp_path):
    """Pitfall 1: diffusers maps kohya alphas to `…attn1.processor.to_q_lora` names that match no PEFT module and
    falls back to the majority alpha. lorakit applies alpha/rank·up·down per module. diffusers' side is checked only
    on 0.42.1, where it was observed: a later fix upstream must not fail lorakit's test."""
    import diffusers

    attn = "down_blocks.0.attentions.0.transformer_blocks.0"
    alphas = {f"{attn}.attn1.to_q": 1, f"{attn}.attn1.to_k": 1, f"{attn}.attn2.to_q": 4, f"{attn}.attn2.to_v": 0.5}
    deltas = kohya_attention_file(tiny_sd.unet, tmp_path / "dyn.safetensors", alphas)
    ours, theirs, truth = copy.deepcopy(tiny_sd), copy.deepcopy(tiny_sd), copy.deepcopy(tiny_sd)
    for module, dw in deltas.items():
        with_delta(truth.unet.get_submodule(module), dw)
    lorakit.load(ours, tmp_path / "dyn.safetensors")
    want, got = unet_out(truth.unet), unet_out(ours.unet)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if diffusers.__version__ == "0.42.1":
        theirs.load_lora_weights(str(tmp_path / "dyn.safetensors"))
        assert (unet_out(theirs.unet) - want).abs().max() > 1e-3  # diffusers 0.42.1 gets this wrong


# --- LyCORIS ---------------------------------------------------------------------------------------
_G = torch.Generator().manual_seed(0)


def r(*shape):
    """Random factor values."""
    return torch.randn(*shape, generator=_G) * 0.5


def loha_linear():
    """LoHa on a Linear: (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r, r = 2."""
    t = {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 8), "hada_w2_a": r(8, 2), "hada_w2_b": r(2, 8)}
    return t, (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (1.0 / 2), 1.0


def loha_tucker_conv():
    """Tucker LoHa on a 3x3 conv (cores hada_t1/hada_t2)."""
    t = {"hada_w1_a": r(2, 16), "hada_w1_b": r(2, 8), "hada_t1": r(2, 2, 3, 3),
         "hada_w2_a": r(2, 16), "hada_w2_b": r(2, 8), "hada_t2": r(2, 2, 3, 3)}
    dw = torch.zeros(16, 8, 3, 3)
    ij = [(i, j) for i in range(2) for j in range(2)]
    for o in range(16):  # the Tucker rebuild written out: Σ_ij t[i, j] · w_a[i, o] · w_b[j, c]
        for c in range(8):
            w1 = sum(t["hada_t1"][i, j] * t["hada_w1_a"][i, o] * t["hada_w1_b"][j, c] for i, j in ij)
            w2 = sum(t["hada_t2"][i, j] * t["hada_w2_a"][i, o] * t["hada_w2_b"][j, c] for i, j in ij)
            dw[o, c] = w1 * w2
    return t, dw * (3.0 / 2), 3.0


def loha_flat_conv():
    """Non-Tucker LoHa on a 3x3 conv: the kernel is stored flat, (r, in·3·3)."""
    t = {"hada_w1_a": r(16, 2), "hada_w1_b": r(2, 72), "hada_w2_a": r(16, 2), "hada_w2_b": r(2, 72)}
    dw = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(16, 8, 3, 3)
    return t, dw * (2.0 / 2), 2.0


def kron(a, b):
    """The Kronecker product written out: block (i, j) is a[i, j]·b."""
    return torch.cat([torch.cat([a[i, j] * b for j in range(a.shape[1])], 1) for i in range(a.shape[0])], 0)


def lokr_linear():
    """LoKr on a Linear: w1 ⊗ (w2_a·w2_b)."""
    t = {"lokr_w1": r(2, 2), "lokr_w2_a": r(4, 1), "lokr_w2_b": r(1, 4)}
    return t, kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 0.5, 0.5  # r = 1 (w2_b's rows)


def lokr_full_ignores_alpha():
    """LoKr with both Kronecker factors full."""
    t = {"lokr_w1": r(2, 4), "lokr_w2": r(4, 2)}
    return t, kron(t["lokr_w1"], t["lokr_w2"]), 7.0  # both factors full: scale 1 whatever alpha says


def lokr_conv():
    """LoKr on a 3x3 conv: (w1_a·w1_b) ⊗ w2, w2 a full 4-D kernel."""
    t = {"lokr_w1_a": r(2, 1), "lokr_w1_b": r(1, 2), "lokr_w2": r(8, 4, 3, 3)}
    w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    dw = torch.stack([kron(w1, t["lokr_w2"][..., i, j]) for i in range(3) for j in range(3)], -1).reshape(16, 8, 3, 3)
    return t, dw * 2.0, 2.0  # r = 1 (w1_b's rows), alpha 2


@pytest.mark.parametrize("case, name", [(loha_linear, Q), (loha_tucker_conv, C), (loha_flat_conv, C),
                                        (lokr_linear, Q), (lokr_full_ignores_alpha, Q), (lokr_conv, C)])
def test_loha_and_lokr_are_materialised_exactly(tmp_path, case, name):
    factors, dw, alpha = case()
    tensors = {f"{name}.{k}": v for k, v in factors.items()} | {f"{name}.alpha": torch.tensor(alpha)}
    save_file(tensors, tmp_path / "ly.safetensors")
    with pytest.warns(UserWarning, match="full-rank"):
        a, fmt = lorakit.read(tmp_path / "ly.safetensors")
    (path, ml), = a.modules.items()
    assert fmt == "lycoris" and ml.alpha == ml.r  # scale 1: the file's scale is inside the factors
    assert torch.allclose(delta(ml), dw.flatten(1).double(), atol=1e-5)
    unet, truth = tiny_unet(), tiny_unet()
    with_delta(truth.get_submodule(path[len("unet."):]), dw)
    with pytest.warns(UserWarning, match="full-rank"):
        lorakit.load(unet, tmp_path / "ly.safetensors")
    got, want = unet_out(unet), unet_out(truth)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_lycoris_file_with_locon_modules_reads_them_as_low_rank(tmp_path):
    factors, _, _ = loha_linear()
    down, mid, up = r(2, 8, 1, 1), r(2, 2, 3, 3), r(16, 2, 1, 1)  # Tucker LoCon: ΔW = up · mid · down
    tensors = {f"{Q}.{k}": v for k, v in factors.items()} | {
        f"{C}.lora_down.weight": down, f"{C}.lora_mid.weight": mid, f"{C}.lora_up.weight": up,
        f"{C}.alpha": torch.tensor(1.0)}
    save_file(tensors, tmp_path / "mix.safetensors")
    with pytest.warns(UserWarning, match="1 LoHa/LoKr"):
        a, _ = lorakit.read(tmp_path / "mix.safetensors")
    ml = a.modules[CONV1]
    want = torch.einsum("or,rs...,si->oi...", up.flatten(1), mid, down.flatten(1)) / 2
    assert ml.r == 2 and ml.kind == "conv" and torch.allclose(delta(ml), want.flatten(1).double(), atol=1e-6)


# --- bad files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensors, key, message", [
    ({f"{Q}.lora_down.weight": torch.ones(4, 8)}, f"{Q}.lora_down.weight", "no matching"),
    (_pair(r_up=3), Q, "rank 4 but lora_up of rank 3"),
    (_pair() | _pair("lora_vae_decoder_conv_in"), "lora_vae_decoder_conv_in", "unknown prefix"),
    (_pair() | _pair(f"lora_unet_{ATTN}_attn1_to_qq"), "to_qq", "not a Stable Diffusion"),
    (_pair() | _pair("lora_unet_input_blocks_1_0_foo"), "input_blocks_1_0_foo", "no diffusers counterpart"),
    (_pair() | {f"{Q}.alpha": torch.tensor(float("nan"))}, f"{Q}.alpha", "NaN"),
    (_pair() | {f"{Q}.lora_down.weight": torch.full((4, 8), float("inf"))}, f"{Q}.lora_down.weight", "NaN or Inf"),
    (_pair() | {f"{Q}.alpha": torch.ones(2)}, f"{Q}.alpha", "scalar"),
    (_pair() | {f"{Q}.lora_magic": torch.ones(2)}, f"{Q}.lora_magic", "not a key"),
    (_pair() | {f"{Q}.dora_scale": torch.ones(1, 7)}, f"{Q}.dora_scale", r"shape \[1, 7\]; expected \(1, 8\)"),
    ({f"{Q}.hada_w1_a": torch.ones(8, 2), f"{Q}.hada_w1_b": torch.ones(2, 8)}, Q, "hada_w2_a"),
    ({f"{Q}.lokr_w1": torch.ones(2, 2), f"{Q}.lokr_w2_a": torch.ones(4, 1)}, Q, "lokr_w2_b"),
])
def test_malformed_files_are_refused_and_leave_the_model_unchanged(tiny_sd, tmp_path, tensors, key, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    before = snapshot(tiny_sd)
    with pytest.raises(LoraError, match=message) as e:
        lorakit.load(tiny_sd, path)
    assert str(path) in str(e.value) and key in str(e.value)
    after = snapshot(tiny_sd)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _header_file(path, header: dict, body: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def test_truncated_and_forged_files_are_refused(tiny_sd, tmp_path):
    good = lorakit.save(adapted(copy.deepcopy(tiny_sd)), tmp_path / "good.safetensors", format="kohya")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    huge = tmp_path / "huge.safetensors"  # 2^40 x 2^30 floats declared, 16 bytes present
    _header_file(huge, {f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [2**40, 2**30], "data_offsets": [0, 16]}},
                 bytes(16))
    far = tmp_path / "far.safetensors"  # offsets pointing far past the end of the file
    _header_file(far, {f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}},
                 bytes(16))
    before = snapshot(tiny_sd)
    for path in (cut, huge, far):
        with pytest.raises(LoraError, match="truncated or corrupt") as e:
            lorakit.load(tiny_sd, path)
        assert str(path) in str(e.value)
    after = snapshot(tiny_sd)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --- SD1's 1x1-conv proj_in <-> SD2/XL's Linear proj_in ------------------------------------------
@pytest.mark.parametrize("file_conv, model_linear", [(True, True), (False, False)])
def test_proj_in_factors_move_between_1x1_conv_and_linear(tmp_path, file_conv, model_linear):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = r(4, 8), r(8, 4)
    ones = (1, 1) if file_conv else ()
    save_file({f"{name}.lora_down.weight": down.reshape(4, 8, *ones), f"{name}.lora_up.weight": up.reshape(8, 4, *ones),
               f"{name}.alpha": torch.tensor(2.0)}, tmp_path / "p.safetensors")
    unet, truth = tiny_unet(linear_proj=model_linear), tiny_unet(linear_proj=model_linear)
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear) == model_linear
    with_delta(truth.down_blocks[0].attentions[0].proj_in, 2.0 / 4 * up @ down)
    lorakit.load(unet, tmp_path / "p.safetensors")
    got, want = unet_out(unet), unet_out(truth)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
