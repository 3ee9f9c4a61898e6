"""PyTorch port of a Reflex Attention decoder exported by reflex_jax (`model_type` "reflex_jax").

This file is copied next to the weights by reflex_jax's HF export and loaded with
`trust_remote_code=True`; it imports only torch and transformers. It computes what
reflex_jax/model/decoder.py computes, reading the resolved `layer_plan` of the config:

* layer l has Q for all H heads and K/V for its `n_self` self heads only; query head h < n_self
  reads the layer's own K/V head h, and the following heads read, cross group by cross group, the
  listed `source_heads` of the group's `source` layer (an earlier layer);
* the KV cache (transformers' DynamicCache) stores only each layer's self heads, so layers hold
  different head counts; cross heads read the already updated cache of their source layer, which
  the layer loop has written before;
* RoPE in the half-split (GPT-NeoX) layout, keys rotated once at their own positions (borrowed keys
  are never rotated again), or learned absolute positions;
* RMSNorm or LayerNorm computed in float32, SwiGLU or GELU (tanh), biases on or off, tied or
  untied LM head.

Positions count real tokens only: with an `attention_mask` and no `position_ids`, a left-padded
row's first real token is at position 0, as in reflex_jax's sampler.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_reflex_jax import ReflexJaxConfig


class ReflexJaxRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class ReflexJaxLayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        var = (x32 - mean).pow(2).mean(-1, keepdim=True)
        y = (x32 - mean) * torch.rsqrt(var + self.eps) * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def make_norm(config: ReflexJaxConfig) -> nn.Module:
    s = config.reflex_model
    if s["norm"] == "rmsnorm":
        return ReflexJaxRMSNorm(config.hidden_size, s["norm_eps"])
    return ReflexJaxLayerNorm(config.hidden_size, s["norm_eps"], bias=s["bias"])


def apply_rope(x_BHTD, positions_BT, theta: float):
    """Rotary embedding, half-split layout, computed in float32."""
    d = x_BHTD.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x_BHTD.device) / d)
    angles = positions_BT.float()[..., None] * inv_freq  # B T D/2
    sin, cos = angles.sin()[:, None], angles.cos()[:, None]  # B 1 T D/2
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHTD.dtype)


class ReflexJaxMLP(nn.Module):
    def __init__(self, config: ReflexJaxConfig):
        super().__init__()
        s, E, hidden = config.reflex_model, config.hidden_size, config.intermediate_size
        self.gelu = s["mlp"] == "gelu"
        if self.gelu:
            self.fc = nn.Linear(E, hidden, bias=s["bias"])
            self.proj = nn.Linear(hidden, E, bias=s["bias"])
        else:
            self.gate = nn.Linear(E, hidden, bias=s["bias"])
            self.up = nn.Linear(E, hidden, bias=s["bias"])
            self.down = nn.Linear(hidden, E, bias=s["bias"])

    def forward(self, x):
        if self.gelu:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ReflexJaxAttention(nn.Module):
    """Q for the layer's query heads, K/V for the heads it computes, output from its query heads
    (reflex_jax/model/kv.py): self heads read their own K/V head (GQA: shared in groups), cross
    groups read an earlier layer's K/V heads (share "v": their own K and the source's V; a route:
    a softmax-weighted mixture of candidates)."""

    def __init__(self, config: ReflexJaxConfig, layer_idx: int):
        super().__init__()
        s, plan = config.reflex_model, config.layer_plan[layer_idx]
        self.layer_idx = layer_idx
        self.n_self, self.cross = plan["n_self"], plan["cross"]
        # configs exported before the general plans lack these keys: the classic contract
        self.n_kv = plan.get("n_kv", self.n_self)
        self.self_kv_heads = list(plan.get("self_kv_heads", range(self.n_self)))
        self.n_query = self.n_self + sum(g["n_heads"] for g in self.cross)
        self.n_k = self.n_kv + sum(g["n_heads"] for g in self.cross if g.get("share", "kv") == "v")
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = s["rope_theta"] if s["pos_emb"] == "rope" else None
        E, D = config.hidden_size, self.head_dim
        self.q = nn.Linear(E, self.n_query * D, bias=s["bias"])
        self.k = nn.Linear(E, self.n_k * D, bias=s["bias"]) if self.n_k else None
        self.v = nn.Linear(E, self.n_kv * D, bias=s["bias"]) if self.n_kv else None
        self.o = nn.Linear(self.n_query * D, E, bias=s["bias"])
        mixtures = [g["mixture"] for g in self.cross if g.get("mixture")]
        self.route_logits = (nn.Parameter(torch.zeros(self.n_query - self.n_self, len(mixtures[0])))
                             if mixtures else None)
        self.value_mix = (nn.Parameter(torch.full((2,), 0.5))
                          if s.get("value_residual") and layer_idx and self.n_kv else None)

    def _heads(self, x, n):
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)  # B n T D

    def _project(self, linear, x, n):
        if linear is None:  # a borrowing layer computes no K/V
            return x.new_zeros(x.shape[0], 0, x.shape[1], self.head_dim)
        return self._heads(linear(x), n)

    def forward(self, x, positions_BT, bias_B1TS, cache, earlier, v_first):
        """(output, this layer's K/V over every cached position, this step's V before the value
        residual): the later layers read the K/V, every layer's value residual the V of layer 0."""
        q = self._heads(self.q(x), self.n_query)
        k, v = self._project(self.k, x, self.n_k), self._project(self.v, x, self.n_kv)
        if self.rope_theta is not None:
            q = apply_rope(q, positions_BT, self.rope_theta)
            k = apply_rope(k, positions_BT, self.rope_theta)
        v_fresh = v
        if self.value_mix is not None:
            mix = self.value_mix.to(v.dtype)
            v = mix[0] * v + mix[1] * v_first[:, :self.n_kv].to(v.dtype)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        keys, values = [], []
        if self.n_self:
            index = torch.tensor(self.self_kv_heads, device=k.device)
            keys.append(k[:, :self.n_kv].index_select(1, index))
            values.append(v.index_select(1, index))
        k_at, row = self.n_kv, 0
        for g in self.cross:
            n = g["n_heads"]
            if g.get("mixture"):
                k_j = torch.stack([earlier[layer][0][:, head] for layer, head in g["mixture"]], 1)
                v_j = torch.stack([earlier[layer][1][:, head] for layer, head in g["mixture"]], 1)
                w = torch.softmax(self.route_logits[row:row + n].float(), -1).to(k_j.dtype)
                gk, gv = (torch.einsum("bjsd,nj->bnsd", t, w).to(k.device) for t in (k_j, v_j))
            else:
                src_k, src_v = earlier[g["source"]]
                index = torch.tensor(g["source_heads"], device=src_k.device)
                gk = src_k.index_select(1, index).to(k.device)
                gv = src_v.index_select(1, index).to(v.device)
            if g.get("share", "kv") == "v":  # its own K heads, after the exported ones
                gk, k_at = k[:, k_at:k_at + n], k_at + n
            keys.append(gk)
            values.append(gv)
            row += n
        y = F.scaled_dot_product_attention(q, torch.cat(keys, 1), torch.cat(values, 1),
                                           attn_mask=bias_B1TS.to(q.dtype))
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_query * self.head_dim)), (k, v), v_fresh


class ReflexJaxBlock(nn.Module):
    def __init__(self, config: ReflexJaxConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = ReflexJaxAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = ReflexJaxMLP(config)
        self.drop = nn.Dropout(config.reflex_model["dropout"])

    def forward(self, x, positions_BT, bias_B1TS, cache, earlier, v_first):
        a, kv, v_fresh = self.attn(self.ln_1(x), positions_BT, bias_B1TS, cache, earlier, v_first)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, kv, v_fresh


def positions_from_mask(attention_mask, past: int, length: int, device):
    """Per-row positions of the `length` new tokens: real tokens counted from 0 (pads at 0)."""
    if attention_mask is None:
        return (torch.arange(length, device=device) + past)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -length:]


def attention_bias(attention_mask, past: int, length: int, dtype, device):
    """Additive [B|1, 1, T, S] bias: query t (slot past+t) sees key slots <= past+t that the
    mask keeps. A padding query also sees its own slot: no row is fully hidden, so none turns
    into NaN in any dtype (real queries never see padding, so what padding rows hold is unused)."""
    S = past + length
    q_slot = torch.arange(length, device=device)[:, None] + past
    k_slot = torch.arange(S, device=device)[None, :]
    visible = (k_slot <= q_slot)[None]  # 1 T S
    if attention_mask is not None:
        visible = (visible & attention_mask[:, None, -S:].bool().to(device)) | (k_slot == q_slot)
    bias = torch.zeros(visible.shape, dtype=dtype, device=device)
    return bias.masked_fill(~visible, torch.finfo(dtype).min)[:, None]


class ReflexJaxPreTrainedModel(PreTrainedModel):
    config_class = ReflexJaxConfig
    base_model_prefix = "model"
    _no_split_modules = ["ReflexJaxBlock"]
    _input_embed_layer = "wte"
    supports_gradient_checkpointing = False


class ReflexJaxModel(ReflexJaxPreTrainedModel):
    def __init__(self, config: ReflexJaxConfig):
        super().__init__(config)
        s = config.reflex_model
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                    if s["pos_emb"] == "learned" else None)
        self.drop = nn.Dropout(s["dropout"])
        self.layers = nn.ModuleList(ReflexJaxBlock(config, i)
                                    for i in range(config.num_hidden_layers))
        self.ln_f = make_norm(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, x.device)
        position_ids = position_ids.expand(B, T)
        if self.wpe is not None:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} is beyond the model's "
                                 f"{self.config.max_position_embeddings} learned positions")
            x = x + self.wpe(position_ids)
        x = self.drop(x)
        bias = attention_bias(attention_mask, past, T, x.dtype, x.device)
        earlier, v_first = [], None
        for i, block in enumerate(self.layers):
            x, kv, v_fresh = block(x, position_ids, bias, cache, earlier, v_first)
            earlier.append(kv)
            if i == 0:
                v_first = v_fresh  # layer 0's V of these tokens (value_residual)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), cache=cache)


class ReflexJaxForCausalLM(ReflexJaxPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"}

    def __init__(self, config: ReflexJaxConfig):
        super().__init__(config)
        self.model = ReflexJaxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                cache: Cache | None = None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h).float()  # float32 logits, as reflex_jax returns them
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["ReflexJaxForCausalLM", "ReflexJaxModel", "ReflexJaxPreTrainedModel"]
