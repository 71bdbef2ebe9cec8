"""cloneofsimo/lora (lora_diffusion) files: index-based modules bound onto a model, and learned token embeddings."""

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.core.components import as_module
from lorakit.core.errors import LoraError
from lorakit.formats import adapter as canonical
from lorakit.formats import cloneofsimo, io, native
from lorakit.formats.adapter import Adapter, ModuleLora
from lorakit.formats.embeddings import add_tokens

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_linears(unet):
    """cloneofsimo's default UNet order, listed by hand: per transformer block attn1, attn2, then GEGLU's proj."""
    blocks = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    return [f"{b}.{s}" for b in blocks for s in [*(f"attn1.{p}" for p in ATTN), *(f"attn2.{p}" for p in ATTN),
                                                  "ff.net.0.proj"]]


def unet_extended(unet):
    """Extended mode (ResnetBlock2D too): each resnet's conv1, time_emb_proj, conv2, conv_shortcut, in model order."""
    out = []
    for n, m in unet.named_modules():
        if type(m).__name__ == "ResnetBlock2D":
            out += [f"{n}.conv1", f"{n}.time_emb_proj", f"{n}.conv2"]
            out += [f"{n}.conv_shortcut"] if m.conv_shortcut else []
        elif type(m).__name__ == "BasicTransformerBlock":
            out += unet_linears_of_block(n)
    return out


def unet_linears_of_block(b):
    return [*(f"{b}.attn1.{p}" for p in ATTN), *(f"{b}.attn2.{p}" for p in ATTN), f"{b}.ff.net.0.proj"]


def clip_linears(clip):
    attns = [n for n, m in clip.named_modules() if n.endswith("self_attn")]
    return [f"{a}.{p}" for a in attns for p in ("k_proj", "v_proj", "q_proj", "out_proj")]


def make_file(path, pipe, r=2, unet_paths=None, targets=None, embeds=None):
    """What lora_diffusion's save_safeloras_with_embeds writes, for the given module order. Returns the factors."""
    torch.manual_seed(3)
    unet_paths = unet_paths or unet_linears(pipe.unet)
    tensors, metadata, factors = {}, {}, {}
    parts = {"unet": (pipe.unet, unet_paths, targets or ["CrossAttention", "Attention", "GEGLU"]),
             "text_encoder": (pipe.text_encoder, clip_linears(pipe.text_encoder), ["CLIPAttention"])}
    for comp, (model, paths, tgt) in parts.items():
        metadata[comp] = json.dumps(tgt)
        names = dict(model.named_modules())
        for i, p in enumerate(paths):
            w = names[p].weight
            down = torch.randn(r, *w.shape[1:]) * 0.3
            up = torch.randn(w.shape[0], r, *[1] * (w.dim() - 2)) * 0.3
            tensors[f"{comp}:{i}:up"], tensors[f"{comp}:{i}:down"] = up, down
            metadata[f"{comp}:{i}:rank"] = str(r)
            factors[f"{comp}.{p}"] = (up, down)
    for token, vec in (embeds or {}).items():
        tensors[token], metadata[token] = vec, "<embed>"
    save_file(tensors, str(path), metadata)
    return factors


def with_deltas(model, comp, factors):
    """A copy of the model with W += up @ down on each module the file names (cloneofsimo's scale is 1)."""
    model = copy.deepcopy(model)
    names = dict(model.named_modules())
    with torch.no_grad():
        for key, (up, down) in factors.items():
            c, _, p = key.partition(".")
            if c == comp:
                w = names[p].weight
                w += (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return model


def unet_out(unet):
    torch.manual_seed(5)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 16)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def clip_out(clip):
    with torch.no_grad():
        return clip(torch.tensor([[53, 3, 7, 54]])).last_hidden_state


def read_file(path):
    """(tensors, header metadata) of a safetensors file."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def test_traversal_is_cloneofsimos_order(tiny_sd):
    assert [p for p, _ in cloneofsimo.traversal(tiny_sd.unet, cloneofsimo.UNET_TARGETS)] == unet_linears(tiny_sd.unet)
    assert len(unet_linears(tiny_sd.unet)) == 6 * 9
    assert [p for p, _ in cloneofsimo.traversal(tiny_sd.text_encoder, ["CLIPAttention"])] == clip_linears(
        tiny_sd.text_encoder)
    ext = cloneofsimo.traversal(tiny_sd.unet, cloneofsimo.UNET_EXTENDED_TARGETS, conv=True)
    assert [p for p, _ in ext] == unet_extended(tiny_sd.unet)


def test_load_onto_pipeline(tiny_sd, tmp_path):
    f = tmp_path / "lora.safetensors"
    vec = torch.randn(16)
    factors = make_file(f, tiny_sd, embeds={"<s1>": vec})
    tensors, metadata = read_file(f)
    assert cloneofsimo.looks_like(tensors, metadata)
    a, fmt = io.read(f)
    assert fmt == "cloneofsimo"
    assert set(a.modules) == {f"unet:{i}" for i in range(54)} | {f"text_encoder:{i}" for i in range(8)}
    assert torch.equal(a.embeddings["<s1>"], vec)

    want_unet = unet_out(with_deltas(tiny_sd.unet, "unet", factors))
    want_clip = clip_out(with_deltas(tiny_sd.text_encoder, "text_encoder", factors))
    base = unet_out(tiny_sd.unet)
    view = as_module(tiny_sd)
    bound = cloneofsimo.bind(a, view, str(f))
    assert set(bound.modules) == set(factors)
    assert all(m.alpha == m.r == 2 for m in bound.modules.values())
    canonical.apply(view, bound, "clone", source=str(f))
    got = unet_out(tiny_sd.unet)
    assert not torch.allclose(got, base, atol=1e-4)
    torch.testing.assert_close(got, want_unet, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(clip_out(tiny_sd.text_encoder), want_clip, atol=1e-5, rtol=1e-4)


def test_bind_onto_lone_unet(tiny_sd, tmp_path):
    f = tmp_path / "lora.safetensors"
    factors = make_file(f, tiny_sd)
    a = cloneofsimo.read(*read_file(f), str(f))
    unet = tiny_sd.unet
    want = unet_out(with_deltas(unet, "unet", factors))
    with pytest.warns(UserWarning, match="text_encoder"):
        bound = cloneofsimo.bind(a, unet, str(f))
    assert set(bound.modules) == set(unet_linears(unet))
    canonical.apply(unet, bound, "clone", source=str(f))
    torch.testing.assert_close(unet_out(unet), want, atol=1e-5, rtol=1e-4)
    # binding again on the adapted model sees the same modules (lorakit's own parts are not counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(cloneofsimo.bind(a, unet, str(f)).modules) == set(bound.modules)


def test_extended_mode_convs(tiny_sd, tmp_path):
    f = tmp_path / "ext.safetensors"
    factors = make_file(f, tiny_sd, unet_paths=unet_extended(tiny_sd.unet),
                        targets=["ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"])
    a, _ = io.read(f)
    assert {m.kind for m in a.modules.values()} == {"linear", "conv"}
    want = unet_out(with_deltas(tiny_sd.unet, "unet", factors))
    view = as_module(tiny_sd)
    canonical.apply(view, cloneofsimo.bind(a, view, str(f)), "ext", source=str(f))
    torch.testing.assert_close(unet_out(tiny_sd.unet), want, atol=1e-5, rtol=1e-4)


def test_module_count_mismatch(tiny_sd, tmp_path):
    f = tmp_path / "lora.safetensors"
    make_file(f, tiny_sd)
    a, _ = io.read(f)
    view = as_module(tiny_sd)
    short = Adapter({k: v for k, v in a.modules.items() if k != "unet:53"})  # made for a smaller model
    with pytest.raises(LoraError, match="holds 53 modules.*has 54 .*different model or diffusers version"):
        cloneofsimo.bind(short, view, str(f))
    long = Adapter({**a.modules, "unet:54": a.modules["unet:0"]})  # made for a bigger one
    with pytest.raises(LoraError, match="holds 55 modules.*only 54 .*different model or diffusers version"):
        cloneofsimo.bind(long, view, str(f))
    swapped = Adapter({**a.modules, "unet:0": a.modules["unet:8"]})  # the same count, another layout
    with pytest.raises(LoraError, match="unet:0 .*falls on .*attn1.to_q"):
        cloneofsimo.bind(swapped, view, str(f))
    assert not any(hasattr(m, "lora_A") for m in tiny_sd.unet.modules())  # nothing was put on the model


def test_damaged_files(tiny_sd, tmp_path):
    f = tmp_path / "lora.safetensors"
    make_file(f, tiny_sd)
    tensors, metadata = read_file(f)
    del tensors["unet:3:down"]
    with pytest.raises(LoraError, match="unet:3:down"):
        cloneofsimo.read(tensors, metadata, "x")
    tensors, metadata = read_file(f)
    tensors["unet:0:up"] = tensors["unet:0:up"][:, :1]
    with pytest.raises(LoraError, match="unet:0"):
        cloneofsimo.read(tensors, metadata, "x")
    tensors, metadata = read_file(f)
    metadata["unet"] = "not json"
    with pytest.raises(LoraError, match="JSON list"):
        cloneofsimo.read(tensors, metadata, "x")


def test_embeddings_added(tiny_sd):
    tok, enc = tiny_sd.tokenizer, tiny_sd.text_encoder
    n, rows = len(tok), enc.get_input_embeddings().weight.shape[0]
    v1, v2 = torch.randn(16), torch.randn(16)
    ids = add_tokens(tok, enc, {"<s1>": v1, "<s2>": v2})
    assert ids == [n, n + 1] and len(tok) == n + 2
    assert tok("<s1>").input_ids == [tok.bos_token_id, n, tok.eos_token_id]
    assert tok("a <s2> b").input_ids[2] == n + 1
    w = enc.get_input_embeddings().weight
    assert w.shape[0] == rows  # the tiny CLIP's table (64) already has room: it only ever grows
    assert torch.equal(w[n], v1) and torch.equal(w[n + 1], v2)
    # a known token is refused: a learned row never replaces one the tokenizer already has
    with pytest.raises(LoraError, match="already in the tokenizer"):
        add_tokens(tok, enc, {"<s1>": torch.randn(16)})
    assert len(tok) == n + 2 and torch.equal(enc.get_input_embeddings().weight[n], v1)


def test_embeddings_grow_the_table(tiny_sd):
    tok, enc = tiny_sd.tokenizer, tiny_sd.text_encoder
    vecs = {f"<t{i}>": torch.randn(16) for i in range(12)}  # 55 + 12 > 64 rows
    ids = add_tokens(tok, enc, vecs)
    w = enc.get_input_embeddings().weight
    assert w.shape[0] == max(ids) + 1 == len(tok)
    assert all(torch.equal(w[i], v) for i, v in zip(ids, vecs.values()))


@pytest.mark.parametrize("bad", [torch.randn(8), torch.full((16,), float("nan")), torch.randn(2, 16)])
def test_bad_embedding_changes_nothing(tiny_sd, bad):
    tok, enc = tiny_sd.tokenizer, tiny_sd.text_encoder
    n, w0 = len(tok), enc.get_input_embeddings().weight.clone()
    with pytest.raises(LoraError, match="<bad>"):
        add_tokens(tok, enc, {"<ok>": torch.randn(16), "<bad>": bad})
    assert len(tok) == n and "<ok>" not in tok.get_vocab()
    assert torch.equal(enc.get_input_embeddings().weight, w0)


def test_embeddings_native_round_trip(tmp_path):
    a = Adapter({"unet.x": ModuleLora(torch.randn(2, 4), torch.randn(3, 2), 2.0, "linear")},
                embeddings={"<s1>": torch.randn(16), "<s2>": torch.randn(16)})
    tensors, metadata = native.write(a)
    f = tmp_path / "n.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata)
    b = native.read(*read_file(f), str(f))
    assert list(b.embeddings) == ["<s1>", "<s2>"]
    assert all(torch.equal(b.embeddings[k], a.embeddings[k]) for k in a.embeddings)
    # version-1 files written before embeddings existed: no header key, no embeddings
    tensors, metadata = native.write(Adapter(a.modules))
    assert "embeddings" not in metadata
    assert native.read(tensors, metadata, "old").embeddings == {}
    # a token listed in the header without its tensor is an incomplete file
    tensors, metadata = native.write(a)
    del tensors["embed.<s2>"]
    with pytest.raises(LoraError, match="<s2>"):
        native.read(tensors, metadata, "x")


def test_embeddings_only_file(tiny_sd, tmp_path):
    f = tmp_path / "ti.safetensors"
    vec = torch.randn(1, 16)  # (1, dim) is read as one vector
    save_file({"<s1>": vec}, str(f), {"<s1>": "<embed>"})
    a, fmt = io.read(f)
    assert fmt == "cloneofsimo" and not a.modules and a.embeddings["<s1>"].shape == (16,)
    assert cloneofsimo.bind(a, tiny_sd.unet, str(f)) is a
