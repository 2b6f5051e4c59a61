"""Released SpinQuant / OSTQuant transform files: imported transforms give exactly the weights the
papers' own deployment code computes (re-implemented here from their sources, in plain torch)."""
import logging

import pytest
import torch

from orthoquant import quantize
from orthoquant.config import FitSpec, Recipe
from orthoquant.errors import UserError
from orthoquant.models.generic import spec_for
from orthoquant.models.surgery import fold_all_norms
from orthoquant.models.tiny import tiny_model

from helpers import token_windows

IDS = token_windows(2, 15)
CALIB = token_windows(2, 8, 1)
HIDDEN, HEADS, KV, HD, INTER, LAYERS = 64, 4, 2, 16, 96, 2
G = torch.Generator().manual_seed(5)


def orthogonal(*shape):
    q, r = torch.linalg.qr(torch.randn(*shape, generator=G, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def positive(n):
    return torch.rand(n, generator=G, dtype=torch.float64) + 0.5


def imported(path):
    """A float64 tiny Llama quantized with nothing but the released transforms, and its reference logits."""
    model = tiny_model("llama", dtype=torch.float64)
    with torch.no_grad():
        ref = model(IDS).logits
    quantize(model, Recipe(fitting=FitSpec(released=str(path))), CALIB)
    return model, ref


def folded():
    model = tiny_model("llama", dtype=torch.float64)
    fold_all_norms(model, spec_for(model.config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights(model, expected):
    for key, value in expected.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-9, atol=1e-12, msg=key)


def test_spinquant_r_bin(tmp_path):
    R1, R2 = orthogonal(HIDDEN, HIDDEN), [orthogonal(HD, HD) for _ in range(LAYERS)]
    torch.save({"R1": R1, **{f"model.layers.{i}.self_attn.R2": R2[i] for i in range(LAYERS)}}, tmp_path / "R.bin")
    model, ref = imported(tmp_path / "R.bin")
    w = folded()  # SpinQuant's rotation_utils.rotate_model, on the norm-folded model:
    expected = {"model.embed_tokens.weight": w["model.embed_tokens.weight"] @ R1, "lm_head.weight": w["lm_head.weight"] @ R1}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
            expected[p + name + ".weight"] = w[p + name + ".weight"] @ R1
        expected[p + "mlp.down_proj.weight"] = R1.T @ w[p + "mlp.down_proj.weight"]
        v = w[p + "self_attn.v_proj.weight"] @ R1  # apply_exact_had_to_linear(v, head_dim, output=True, R2)
        expected[p + "self_attn.v_proj.weight"] = (v.T.reshape(-1, KV, HD) @ R2[i]).reshape(HIDDEN, -1).T
        o = R1.T @ w[p + "self_attn.o_proj.weight"]  # ... (o, head_dim, output=False, R2)
        expected[p + "self_attn.o_proj.weight"] = (o.reshape(-1, HEADS, HD) @ R2[i]).reshape(o.shape)
    assert_weights(model, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-9, atol=1e-9)


def ostquant_state(tie_qk=True):
    state = {"R_res.weight": orthogonal(HIDDEN, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}.R_S_modules."
        s_qk = positive(KV * HD // 2).reshape(KV, HD // 2)
        s_qk = torch.cat([s_qk, s_qk], -1) if tie_qk else torch.cat([s_qk, positive(KV * HD // 2).reshape(KV, -1)], -1)
        state.update({p + "S_norm_qkv.weight": positive(HIDDEN), p + "S_norm_upgate.weight": positive(HIDDEN),
                      p + "S_qk.weight": s_qk.reshape(-1), p + "S_ov.weight": positive(KV * HD),
                      p + "S_up_down.weight": positive(INTER)})
        state.update({f"{p}R_ov.weight.{h}": orthogonal(HD, HD) for h in range(KV)})
    return state


def ostquant_reference(state):
    """OSTQuant's LM._rotate_layer_inplace / _rotate_embedding_inplace / _rotate_head_inplace."""
    w, R = folded(), state["R_res.weight"]
    out = {"model.embed_tokens.weight": w["model.embed_tokens.weight"] @ R, "lm_head.weight": w["lm_head.weight"] @ R}
    expand = lambda s: s.reshape(KV, -1)[:, None, :].expand(KV, HEADS // KV, HD).reshape(-1)  # noqa: E731
    for i in range(LAYERS):
        p, sp = f"model.layers.{i}.", f"model.layers.{i}.R_S_modules."
        W = {k[len(p):-len(".weight")]: v for k, v in w.items() if k.startswith(p) and k.endswith("proj.weight")}
        s = {k[len(sp):].removesuffix(".weight"): v for k, v in state.items() if k.startswith(sp)}
        W["mlp.up_proj"] = W["mlp.up_proj"] / s["S_up_down"].view(-1, 1)
        W["mlp.down_proj"] = W["mlp.down_proj"] * s["S_up_down"].view(1, -1)
        W["self_attn.k_proj"] = W["self_attn.k_proj"] * s["S_qk"].view(-1, 1)
        W["self_attn.q_proj"] = W["self_attn.q_proj"] / expand(s["S_qk"]).view(-1, 1)
        W["self_attn.v_proj"] = W["self_attn.v_proj"] / s["S_ov"].view(-1, 1)
        W["self_attn.o_proj"] = W["self_attn.o_proj"] * expand(s["S_ov"]).view(1, -1)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.gate_proj"):
            W[name] = W[name] @ R
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            W[name] = R.T @ W[name]
        R_ov = torch.stack([s[f"R_ov.weight.{h}"] for h in range(KV)])
        W["self_attn.v_proj"] = (W["self_attn.v_proj"].T.reshape(-1, KV, HD).unsqueeze(2) @ R_ov).reshape(-1, KV * HD).T
        rep = R_ov[:, None].expand(KV, HEADS // KV, HD, HD).reshape(-1, HD, HD)
        W["self_attn.o_proj"] = (W["self_attn.o_proj"].reshape(-1, HEADS, HD).unsqueeze(2) @ rep).reshape(HIDDEN, -1)
        out[p + "input_layernorm.weight"] = 1 / s["S_norm_qkv"]
        out[p + "post_attention_layernorm.weight"] = 1 / s["S_norm_upgate"]
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            W[name] = W[name] * s["S_norm_qkv"]
        for name in ("mlp.up_proj", "mlp.gate_proj"):
            W[name] = W[name] * s["S_norm_upgate"]
        out.update({p + k + ".weight": v for k, v in W.items()})
    return out


def test_ostquant_file_reproduces_its_deployment(tmp_path):
    state = ostquant_state()
    torch.save(state, tmp_path / "model.bin")
    model, ref = imported(tmp_path / "model.bin")
    assert_weights(model, ostquant_reference(state))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-9, atol=1e-9)


def test_untied_ostquant_s_qk_is_kept_and_reported(tmp_path, caplog):
    torch.save(ostquant_state(tie_qk=False), tmp_path / "model.bin")
    with caplog.at_level(logging.WARNING):
        model, ref = imported(tmp_path / "model.bin")
    assert "RoPE pairs" in caplog.text
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max() > 1e-3  # as released: not function-preserving


def test_unknown_files_are_refused(tmp_path):
    torch.save({"something": torch.zeros(2)}, tmp_path / "x.bin")
    with pytest.raises(UserError, match="neither"):
        imported(tmp_path / "x.bin")
