"""A saved policy, reloaded in a fresh Python process, generates bit-identical tokens on SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity

pytestmark = pytest.mark.slow

PROMPTS = ["Q: What happens if you crack your knuckles a lot?\nA:", "Q: Where is the Eiffel Tower?\nA:"]
NEW_TOKENS = 20
LAYER = 15

CHILD = """
import json, sys
import torch
torch.set_num_threads(1)
from otguard.models import load_model
from otguard.policy import Policy

policy_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
model, tok = load_model("smollm2-135m")
policy = Policy.load(policy_dir, model=model)
tok.padding_side = "left"
enc = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad(), policy.attach(model):
    out = model.generate(**enc, max_new_tokens=int(sys.argv[3]), do_sample=False,
                         pad_token_id=tok.pad_token_id)
print("TOKENS=" + json.dumps(out.tolist()))
"""


def smollm2_policy(model, tok) -> Policy:
    """A random gated RADIANT-style policy on one layer, calibrated so that about half the heads vote."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    grabbed = {}

    def grab(mod, args) -> None:
        grabbed["a"] = args[0].detach().reshape(-1, H, d).double()

    handle = sites.modules[LAYER].register_forward_pre_hook(grab)
    with torch.no_grad():
        model(**tok(PROMPTS[0], return_tensors="pt"))
    handle.remove()
    a = grabbed["a"]
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(H, d, generator=gen, dtype=torch.float64)
    proj = torch.einsum("nhd,hd->nh", a, u)
    W = u / proj.std(0)[:, None]
    w0 = -proj.mean(0) / proj.std(0)
    noise = torch.randn(H, d, d, generator=gen, dtype=torch.float64)
    A = torch.eye(d, dtype=torch.float64) + 0.3 * noise / d**0.5
    b = torch.randn(H, d, generator=gen, dtype=torch.float64) * a.std((0, 2))[:, None]
    edit = LayerEdit(layer=LAYER, probe_weight=W.float(), probe_bias=w0.float(), threshold=H // 2,
                     head_mask=torch.ones(H, dtype=torch.bool), b=b.float(), A=A.float())
    return Policy(method="random", rule="replace", layers=[edit], model=model_identity(model))


def test_reloaded_policy_generates_identical_tokens_in_new_process(smollm2, tmp_path):
    model, tok = smollm2
    policy = smollm2_policy(model, tok)
    policy.save(tmp_path / "policy")
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        plain = model.generate(**enc, **kw)
        with policy.attach(model) as handle:
            edited = model.generate(**enc, **kw)
            stats = handle.stats()
    assert not torch.equal(plain, edited), "the policy does not change the generation; the test is vacuous"
    # Every generated position was seen (one edited layer: the last prompt token + the tokens fed back).
    assert stats["positions"] == len(PROMPTS) * (edited.shape[1] - enc["input_ids"].shape[1])

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "policy"), json.dumps(PROMPTS), str(NEW_TOKENS)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("TOKENS="))
    child = torch.tensor(json.loads(line.removeprefix("TOKENS=")))
    assert torch.equal(child, edited)
