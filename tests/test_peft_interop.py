"""lorakit against the real peft package: adapter folders travel both ways with identical outputs.

Each case trains nothing: adapters are created non-identity (init=False / init_lora_weights=False)
on tiny randomly initialised transformers models, so any difference in keys, scales, layouts or
targeting shows up in the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorakit  # noqa: E402

pytestmark = [  # PEFT's note that it saves the targeted embedding; a transformers 5 deprecation inside PEFT
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TOL = dict(atol=1e-5, rtol=1e-5)
INPUT_IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
TASK_TYPE = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def tiny(arch: str) -> torch.nn.Module:
    """A tiny model of `arch` with random weights (vocab 100, hidden 32, 2 layers), in eval mode."""
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        model = transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def to_peft(arch: str, cfg: lorakit.LoraConfig) -> peft.LoraConfig:
    """The PEFT LoraConfig with the same settings (the field mapping between the two libraries)."""
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets,
        exclude_modules=cfg.exclude, rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern,
        use_rslora=cfg.use_rslora, init_lora_weights=cfg.init, bias=cfg.bias,
        modules_to_save=list(cfg.modules_to_save) or None, fan_in_fan_out=arch == "gpt2",
        task_type=TASK_TYPE[arch])


def train_saved_modules(model):
    """Stand-in for training: modules_to_save copies start equal to the base, so move them away."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name or ".lora_copies." in name:
                p.add_(torch.randn_like(p))


def peft_layout(peft_model) -> dict[str, int | str]:
    """{module name: LoRA rank, or "saved" for modules_to_save} of a one-adapter PEFT model."""
    out = {}
    for name, m in peft_model.named_modules():
        name = name.removeprefix("base_model.model.")
        if isinstance(m, peft.tuners.lora.LoraLayer):
            (out[name],) = m.r.values()
        elif isinstance(m, peft.utils.ModulesToSaveWrapper):
            out[name] = "saved"
    return out


def lorakit_layout(model) -> dict[str, int | str]:
    """{module name: LoRA rank, or "saved" for modules_to_save} of a one-adapter lorakit model."""
    return {n: next(iter(m.lora_A.values())).shape[0] if isinstance(m, lorakit.LoraLayer) else "saved"
            for n, m in model.named_modules() if isinstance(m, (lorakit.LoraLayer, lorakit.SavedModule))}


CASES = [
    pytest.param("llama", dict(targets=["q_proj", "v_proj"]), id="linear-q_proj-v_proj"),
    pytest.param("llama", dict(targets=["q_proj", "v_proj"], use_rslora=True), id="rslora"),
    pytest.param("llama", dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                               rank_pattern={"k_proj": 2, r"layers\.1\..*o_proj": 8},
                               alpha_pattern={"v_proj": 2, "layers.0.self_attn.q_proj": 32}),
                 id="rank_pattern-alpha_pattern"),
    pytest.param("llama", dict(targets=["embed_tokens", "q_proj", "v_proj"]),  # PEFT also saves the base embedding
                 id="embedding"),
    pytest.param("gpt2", dict(targets=["c_attn", "c_proj", "c_fc"]), id="gpt2-conv1d-fan_in_fan_out"),
    pytest.param("bert", dict(targets=["query", "value"], modules_to_save=["classifier"]),
                 id="bert-classifier-modules_to_save"),
    pytest.param("llama", dict(targets="all-linear"), id="llama-all-linear"),
    pytest.param("gpt2", dict(targets="all-linear"), id="gpt2-all-linear"),
    pytest.param("bert", dict(targets="all-linear", modules_to_save=["classifier"]), id="bert-all-linear"),
]


@pytest.mark.parametrize("arch, options", CASES)
def test_peft_adapter_loads_in_lorakit(tmp_path, arch, options):
    base = tiny(arch)
    fresh = copy.deepcopy(base)
    before = logits(base)
    torch.manual_seed(1)
    cfg = lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, init=False, **options)
    peft_model = peft.get_peft_model(base, to_peft(arch, cfg)).eval()
    train_saved_modules(peft_model)
    want = logits(peft_model)
    assert not torch.allclose(want, before, atol=1e-3), "the PEFT adapter should change the output"
    peft_model.save_pretrained(tmp_path)

    lorakit.load(fresh, tmp_path)
    assert lorakit_layout(fresh) == peft_layout(peft_model)
    torch.testing.assert_close(logits(fresh), want, **TOL)
    lorakit.merge(fresh)
    torch.testing.assert_close(logits(fresh), want, **TOL)


@pytest.mark.parametrize("arch, options", CASES)
def test_lorakit_adapter_loads_in_peft(tmp_path, arch, options):
    model = tiny(arch)
    peft_base = copy.deepcopy(model)
    before = logits(model)
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.1, init=False, **options))
    train_saved_modules(model)
    want = logits(model)
    assert not torch.allclose(want, before, atol=1e-3), "the lorakit adapter should change the output"
    lorakit.save(model, tmp_path / "adapter", format="peft")

    peft_model = peft.PeftModel.from_pretrained(peft_base, tmp_path / "adapter").eval()
    assert peft_layout(peft_model) == lorakit_layout(model)
    torch.testing.assert_close(logits(peft_model), want, **TOL)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), logits(peft_model), **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_all_linear_targets_the_same_modules_as_peft(arch):
    cfg = lorakit.LoraConfig(targets="all-linear")
    peft_model = peft.get_peft_model(tiny(arch), to_peft(arch, cfg))
    model = lorakit.inject(tiny(arch), cfg)
    chosen = {n for n, r in lorakit_layout(model).items() if r != "saved"}
    assert chosen == {n for n, r in peft_layout(peft_model).items() if r != "saved"}
    assert not any(n in chosen for n in ("lm_head", "classifier"))


class ConvNet(torch.nn.Module):
    """A plain (non-transformers) model with the layer kinds PEFT and lorakit share beyond Linear."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4)
        self.conv1 = torch.nn.Conv1d(4, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.lin = torch.nn.Linear(8, 3)

    def forward(self, ids):
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (b, 6, t)
        h = self.conv2(torch.relu(h).unsqueeze(-1).expand(-1, -1, -1, 5))
        return self.lin(h.mean((2, 3)))


@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_conv_and_embedding_layers_match_peft(tmp_path, direction):
    torch.manual_seed(0)
    base = ConvNet().eval()
    ids = torch.randint(0, 20, (2, 9))
    cfg = lorakit.LoraConfig(r=2, alpha=6, init=False, targets=["emb", "conv1", "conv2", "lin"])
    if direction == "peft_to_lorakit":
        src = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, lora_alpha=6, init_lora_weights=False, target_modules=cfg.targets)).eval()
        src.save_pretrained(tmp_path)
        dst = copy.deepcopy(base)
        lorakit.load(dst, tmp_path)
    else:
        src = lorakit.inject(copy.deepcopy(base), cfg)
        lorakit.save(src, tmp_path / "a", format="peft")
        dst = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    with torch.no_grad():
        want = src(ids)
        assert not torch.allclose(want, base(ids), atol=1e-3)
        torch.testing.assert_close(dst(ids), want, **TOL)
        lorakit.merge(dst if direction == "peft_to_lorakit" else src)
        torch.testing.assert_close(dst(ids), src(ids), **TOL)
