"""lorakit in one minute: inject, train, save, load on an untouched base, stack, merge, unload.

Runs on a small Llama built from a config (random weights, no download) so it works anywhere;
the LLM workflow (`lorakit train`) does the same on a real pretrained model.
"""

import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
base = LlamaForCausalLM(cfg).eval()
untouched = copy.deepcopy(base)

# The task: continue a sequence counting upward (x -> x+1 mod 64), which a random model cannot do.
starts = torch.randint(0, 64, (256, 1))
data = (starts + torch.arange(24)) % 64


def loss_of(model, batch):
    return model(input_ids=batch, labels=batch).loss


model = lorakit.inject(base, lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
print(lorakit.summary(model), "\n")

with torch.no_grad():
    before = loss_of(model, data[:64]).item()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
model.train()
t0 = time.time()
for step in range(150):
    batch = data[torch.randint(0, len(data), (32,))]
    loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
model.eval()
with torch.no_grad():
    after = loss_of(model, data[:64]).item()
base_sd = untouched.state_dict()
changed = {n.split(".")[-2] for n, p in model.state_dict().items() if n not in base_sd or not torch.equal(p, base_sd[n])}
print(f"trained 150 steps in {time.time() - t0:.1f}s: loss {before:.3f} -> {after:.3f}; tensors changed: {sorted(changed)}")

out = Path(tempfile.mkdtemp()) / "counting.safetensors"
lorakit.save(model, out, base_model="tiny-llama-demo")
print(f"saved {out.name}: {out.stat().st_size / 1024:.1f} KiB "
      f"(the base is {sum(p.numel() for p in untouched.parameters()) * 4 / 2**20:.1f} MiB in fp32)\n")

fresh = copy.deepcopy(untouched)
name = lorakit.load(fresh, out)
x = data[:8]
with torch.no_grad():
    same = torch.allclose(fresh(x).logits, model(x).logits, atol=1e-5)
    print(f"loaded {name!r} onto an untouched base: same logits as the trained model: {same}")
    lorakit.set_weights(fresh, {name: -1.0})
    print(f"weight -1 (negated):  loss {loss_of(fresh, data[:64]).item():.3f}")
    lorakit.set_weights(fresh, {name: 0.5})
    print(f"weight 0.5 (half):    loss {loss_of(fresh, data[:64]).item():.3f}")
    lorakit.set_weights(fresh, {name: 1.0})
    unmerged = fresh(x).logits
    lorakit.merge(fresh)
    print(f"merged: max |merged - unmerged| = {(fresh(x).logits - unmerged).abs().max().item():.2e}")
    lorakit.unmerge(fresh)
    with lorakit.disabled(fresh):
        print(f"disabled: base loss {loss_of(fresh, data[:64]).item():.3f}")
    plain = lorakit.unload(fresh, merge=True)
    print(f"unloaded: plain {type(plain.model.layers[0].self_attn.q_proj).__name__} layers, "
          f"loss {loss_of(plain, data[:64]).item():.3f}")
print(f"\ninspect it with: lorakit inspect {out}")
