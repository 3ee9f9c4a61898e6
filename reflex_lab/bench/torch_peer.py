"""The PyTorch peer of the benchmark: this project's architecture written plainly in PyTorch
(nanoGPT style, `scaled_dot_product_attention`), loaded with exactly the JAX params, and trained
with the same AdamW and clipping. Importing this module imports torch."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

from reflex_jax.errors import ConfigError
from reflex_jax.model import ModelConfig
from reflex_jax.run_config import base_config


class Attention(tnn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.plan = cfg, cfg.layers[layer]
        H, K, D, E = cfg.n_head, self.plan.n_self, cfg.head_dim, cfg.n_embd
        # Q for all H heads, K/V for the K self heads only, in one projection
        self.c_attn = tnn.Linear(E, (H + 2 * K) * D, bias=cfg.bias)
        self.c_proj = tnn.Linear(H * D, E, bias=cfg.bias)

    def forward(self, x_BTE, earlier):
        B, T, _ = x_BTE.shape
        H, K, D = self.cfg.n_head, self.plan.n_self, self.cfg.head_dim
        q, k, v = self.c_attn(x_BTE).split([H * D, K * D, K * D], dim=2)
        q_BHTD = q.view(B, T, H, D).transpose(1, 2)
        k_BKTD = k.view(B, T, K, D).transpose(1, 2)
        v_BKTD = v.view(B, T, K, D).transpose(1, 2)
        ks, vs = [k_BKTD], [v_BKTD]
        for g in self.plan.cross:  # cross heads read the source layer's last c self heads
            lo, hi = g.source_heads[0], g.source_heads[-1] + 1
            ks.append(earlier[g.source][0][:, lo:hi])
            vs.append(earlier[g.source][1][:, lo:hi])
        k_all = torch.cat(ks, 1) if len(ks) > 1 else k_BKTD
        v_all = torch.cat(vs, 1) if len(vs) > 1 else v_BKTD
        y = F.scaled_dot_product_attention(q_BHTD, k_all, v_all, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H * D)), (k_BKTD, v_BKTD)


class MLP(tnn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, F_ = cfg.n_embd, cfg.hidden
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = tnn.Linear(E, F_, bias=cfg.bias)
            self.up = tnn.Linear(E, F_, bias=cfg.bias)
            self.down = tnn.Linear(F_, E, bias=cfg.bias)
        else:
            self.fc = tnn.Linear(E, F_, bias=cfg.bias)
            self.proj = tnn.Linear(F_, E, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def norm(cfg: ModelConfig) -> tnn.Module:
    if cfg.norm == "rmsnorm":
        return tnn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return tnn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(tnn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1, self.attn = norm(cfg), Attention(cfg, layer)
        self.ln_2, self.mlp = norm(cfg), MLP(cfg)

    def forward(self, x, earlier):
        a, own = self.attn(self.ln_1(x), earlier)
        x = x + a
        return x + self.mlp(self.ln_2(x)), own


class TorchGPT(tnn.Module):
    """The same architecture as this project's Decoder; forward returns the mean token loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pos_emb != "learned" or not cfg.tie_embeddings:
            raise ConfigError("TorchGPT covers learned positions and a tied head only.")
        if not cfg.classic_heads or cfg.value_residual:
            raise ConfigError(f"TorchGPT covers the classic head plans (none, all, recent:..., "
                              f"explicit tuples) only, not {cfg.schedule_table()!r}.")
        self.cfg = cfg
        self.wte = tnn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = tnn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = tnn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = norm(cfg)
        self.lm_head = tnn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def hidden(self, idx_BT):
        """The final normed hidden states [B, T, E]."""
        T = idx_BT.shape[1]
        x = self.wte(idx_BT) + self.wpe(torch.arange(T, device=idx_BT.device))
        earlier = []
        for block in self.h:
            x, own = block(x, tuple(earlier))
            earlier.append(own)
        return self.ln_f(x)

    def forward(self, idx_BT, targets_BT):
        logits = self.lm_head(self.hidden(idx_BT))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets_BT.reshape(-1))


def torch_state_from_jax(cfg: ModelConfig, params) -> dict:
    """TorchGPT state dict holding exactly the JAX params (so both sides start from the same weights)."""
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    E, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    sd = {"wte.weight": t(params["wte"]), "wpe.weight": t(params["wpe"]),
          "lm_head.weight": t(params["wte"])}

    def norm_(dst, src):
        sd[f"{dst}.weight"] = t(src["scale"])
        if cfg.norm == "layernorm" and cfg.bias:
            sd[f"{dst}.bias"] = t(src["bias"])

    def linear(dst, kernel_in_out, bias=None):
        sd[f"{dst}.weight"] = t(np.asarray(kernel_in_out).T)
        if cfg.bias:
            sd[f"{dst}.bias"] = t(bias)

    for i, plan in enumerate(cfg.layers):
        p, K = params[f"h_{i}"], plan.n_self
        norm_(f"h.{i}.ln_1", p["ln_1"])
        norm_(f"h.{i}.ln_2", p["ln_2"])
        a = p["attn"]
        kern = np.concatenate([np.asarray(a["q"]["kernel"]).reshape(E, H * D),
                               np.asarray(a["k"]["kernel"]).reshape(E, K * D),
                               np.asarray(a["v"]["kernel"]).reshape(E, K * D)], axis=1)
        bias = (np.concatenate([np.asarray(a[n]["bias"]).reshape(-1) for n in ("q", "k", "v")])
                if cfg.bias else None)
        linear(f"h.{i}.attn.c_attn", kern, bias)
        linear(f"h.{i}.attn.c_proj", np.asarray(a["o"]["kernel"]).reshape(H * D, E),
               a["o"]["bias"] if cfg.bias else None)
        m = p["mlp"]
        names = ("gate", "up", "down") if cfg.mlp == "swiglu" else ("fc", "proj")
        for n in names:
            linear(f"h.{i}.mlp.{n}", m[n]["kernel"], m[n]["bias"] if cfg.bias else None)
    norm_("ln_f", params["ln_f"])
    return sd


def torch_adamw(model: tnn.Module, optim_cfg):
    """AdamW with optax's decay mask (matrices only; no embeddings, biases, norm scales)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        is_matrix = p.dim() >= 2 and top not in ("wte", "wpe", "lm_head")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


class TorchTrain:
    """TorchGPT + AdamW + grad clipping, eager or torch.compile, float32 or bf16 autocast."""

    def __init__(self, cfg: ModelConfig, params, tokens_np, dtype: str, compiled: bool):
        self.kind, self.reflex, self.dtype = "torch.compile" if compiled else "torch eager", \
            cfg.head_plan, dtype
        self.cfg = cfg
        model = TorchGPT(cfg)
        model.load_state_dict(torch_state_from_jax(cfg, params), strict=True)
        self.model = model.train()
        optim_cfg = base_config().optim
        self.opt, self.opt_impl = torch_adamw(model, optim_cfg)
        self.clip = optim_cfg.clip
        self.fwd = torch.compile(model) if compiled else model
        tok = torch.from_numpy(np.asarray(tokens_np, np.int64))
        self.x, self.y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
        self.bf16 = dtype == "bfloat16"
        self.losses: list[float] = []
        self.compile_s = 0.0
        if compiled:  # compile forward and backward now (timed apart); no update, same weights
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                self.fwd(self.x, self.y).backward()
            self.opt.zero_grad(set_to_none=True)
            self.compile_s = time.perf_counter() - t0

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.fwd(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.losses.append(value)
        return value
