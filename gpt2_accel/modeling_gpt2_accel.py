"""The GPT-2 network as a transformers ``PreTrainedModel``.

Read top to bottom: norms and rotary positions -> attention -> MLP -> block -> the model -> the LM head. Names
follow GPT-2 (``c_attn``, ``c_proj``, ``c_fc``, ``wte``, ``wpe``, ``ln_1``, ``ln_2``, ``ln_f``) so OpenAI's weights
map one to one (see convert.py); the modern options (docs/architecture.md) keep those names and add ``q_norm``,
``k_norm`` (QK-norm), ``sinks`` (attention sinks) and ``ln_emb`` (norm after the embedding). Every option defaults
to GPT-2.
This file imports only torch, transformers and its two siblings (configuration, attention): it is copied next to
the weights, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without gpt2_accel.
Nothing here knows about training, data or distributed execution.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import causal_attention
from .configuration_gpt2_accel import GPT2AccelConfig

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: generate() passes it to forward under
# the new keyword and reads it back from the output's new field. This file runs under whatever transformers the
# person loading a checkpoint has, so forward accepts both keywords and outputs use the installed field name.
CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


def make_norm(config: GPT2AccelConfig, dim: int) -> nn.Module:
    """The norm named by ``config.norm_type`` over the last ``dim`` features (LayerNorm is GPT-2's)."""
    affine = config.norm_elementwise_affine
    if config.norm_type == "rmsnorm":
        # x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019); no weight when parameter-free (nanochat).
        return nn.RMSNorm(dim, eps=config.layer_norm_epsilon, elementwise_affine=affine)
    return nn.LayerNorm(
        dim, eps=config.layer_norm_epsilon, elementwise_affine=affine, bias=config.bias and affine
    )


# ---------------------------------------------------------------------------------------------------------------
# Magnitude preservation (EDM2: Karras et al. 2023, "Analyzing and Improving the Training Dynamics of Diffusion
# Models", arXiv:2312.02696). With ``config.magnitude_preserving`` every activation keeps an RMS near 1 through
# depth and training: learned layers use unit-norm weight rows (Sec. 2.2-2.3), fixed functions are rescaled to
# unit output RMS for a unit normal input (Sec. 2.5), and residual sums blend instead of add.
# ---------------------------------------------------------------------------------------------------------------
def mp_normalize(w: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each row of w (..., fan_in) scaled to unit RMS, i.e. norm sqrt(fan_in): EDM2's ``normalize``,
    w / (eps + ||w_row|| / sqrt(fan_in)). Stored MP weights are kept in this form (forced weight normalisation,
    Sec. 2.3: after every optimizer step, ``gpt2_accel.optim.attach_forced_weight_norm``)."""
    rms = torch.linalg.vector_norm(w, dim=-1, keepdim=True) * (w.size(-1) ** -0.5)  # (..., 1)
    return w / (eps + rms)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """EDM2's magnitude-preserving sum (Sec. 2.5): ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2).

    For independent a and b of unit RMS the result has unit RMS; t is b's share (t = 0.5: equal weights). Under
    autocast the branch comes back in bf16/fp16 while the residual stream stays fp32: both go to the wider dtype,
    as ``a + b`` would (``lerp`` itself refuses mixed dtypes)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t**2)


# RMS of each MLP activation over a unit normal input, E[f(x)^2]^(1/2) with x ~ N(0, 1): dividing by it gives unit
# output RMS (EDM2's mp_silu = silu(x) / 0.596, Sec. 2.5). Values by numerical integration in float64
# (tests/test_magnitude_preserving.py recomputes them): silu 0.59647, gelu (tanh form) 0.65207, relu^2 sqrt(3/2).
# SwiGLU, silu(g) * u with g and u independent unit normals, has silu's RMS.
MP_ACTIVATION_RMS = {"gelu": 0.6520688, "relu2": math.sqrt(1.5), "swiglu": 0.5964692}


class MPLinear(nn.Linear):
    """EDM2's magnitude-preserving linear layer (Sec. 2.2, "MP-Conv" for a 1x1 kernel), no bias:

        y = x @ (gain * w_hat / sqrt(fan_in))^T,   w_hat = mp_normalize(w): rows of unit RMS,

    so each output of a unit-RMS input with independent entries has RMS |gain|. The normalisation is part of the
    forward (gradients are orthogonal to each row, EDM2 Sec. 2.3) and the stored rows are re-normalised after each
    step from outside the model, so what is saved is already normalised. ``gain``: a learned scalar (EDM2's
    ``out_gain``), used on the LM head only.
    """

    forced_weight_norm = True  # read by gpt2_accel.optim.attach_forced_weight_norm

    def __init__(self, in_features: int, out_features: int, learned_gain: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.gain = nn.Parameter(torch.ones(())) if learned_gain else None

    def mp_weight(self) -> torch.Tensor:
        """The matrix the forward multiplies by, (out, in): unit-norm rows times the gain."""
        scale = 1 / math.sqrt(self.in_features)
        if self.gain is not None:
            scale = self.gain * scale
        return mp_normalize(self.weight) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.mp_weight())  # (..., out)


class MPEmbedding(nn.Embedding):
    """Embedding rows of unit RMS (EDM2's normalised weights applied to a lookup): each looked-up row has RMS 1,
    so the residual stream starts at unit magnitude. Normalising the looked-up rows equals looking up normalised
    rows, without normalising the whole table every forward."""

    forced_weight_norm = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return mp_normalize(super().forward(ids))  # (B, T, C)


def make_linear(config: GPT2AccelConfig, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A block's Linear: GPT-2's, or EDM2's magnitude-preserving one (no bias) with ``magnitude_preserving``."""
    if config.magnitude_preserving:
        return MPLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=bias)


def rope_inv_freq(config: GPT2AccelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies (hs/2,) and the cos/sin scale, from ``config.rope_parameters``.

    Default: theta^(-2i/hs) (Su et al. 2021). YaRN (Peng et al. 2023, arXiv:2309.00071 sec. 3.2-3.4): dimensions
    that rotate fewer than ``beta_slow`` times over the original context are interpolated (frequency / factor),
    those rotating more than ``beta_fast`` times keep their frequency, with a linear ramp between, and cos/sin are
    scaled by 0.1 ln(factor) + 1 unless ``attention_factor`` is given. Written from the paper; the test compares it
    with transformers' own implementation (the export's) value for value.
    """
    p = config.rope_parameters
    dim, base = config.head_dim, p["rope_theta"]
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # (hs/2,)
    if p["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    factor, original = p["factor"], p["original_max_position_embeddings"]
    scale = p.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def dim_for_rotations(n_rotations: float) -> float:  # the dimension that turns n times over `original`
        return dim * math.log(original / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(p.get("beta_fast") or 32), dim_for_rotations(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # a one-point ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the frequency), 0 = interpolate (divide it by factor)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, scale


def rope_cos_sin(config: GPT2AccelConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin (B or 1, T, hs) of the rotary angles at ``position_ids`` (B or 1, T), computed in fp32.

    Recomputed every forward (a (T, hs) product): no buffer to keep in sync across from_pretrained, meta-device
    loading, FSDP or dtype casts.
    """
    inv_freq, scale = rope_inv_freq(config, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hs): the half-split layout of Llama / Qwen3 / gpt-oss
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + hs/2}) of (B, nh, T, hs) by the angles in cos/sin (B, T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, nh, T, hs)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class GPT2AccelAttention(nn.Module):
    """Causal self-attention; the score function is chosen by ``config.attn_type``.

    ``c_attn`` projects to n_head query heads and n_kv_head key and value heads ([q | k | v], GPT-2's fused
    layout; with n_kv_head = n_head exactly GPT-2's). Optional: QK-norm, rotary positions, a sliding window
    (``config.layer_types[layer_idx]``) and gpt-oss's sinks.
    """

    def __init__(self, config: GPT2AccelConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.attn_type = config.attn_type
        self.n_positions = config.n_positions
        self.config = config
        self.layer_type = config.layer_types[layer_idx] if config.layer_types else "full_attention"
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        kv_width = config.n_kv_head * self.head_dim
        self.c_attn = make_linear(config, config.n_embd, config.n_embd + 2 * kv_width, config.attention_bias)
        self.c_proj = make_linear(config, config.n_embd, config.n_embd, config.attention_bias)
        self.c_proj.is_residual_proj = True  # scaled init, see _init_weights
        if config.qk_norm:  # Qwen3's names; over each head's features
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
        if config.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(config.n_head))  # (nh,) one logit per head; gpt-oss's name
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | dict | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, n_embd
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)  # (B, T, C), 2 x (B, T, nkv * hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)  # before the rotation, as Qwen3
        if position_embeddings is not None:
            q, k = apply_rope(q, *position_embeddings), apply_rope(k, *position_embeddings)
        if cache is not None:
            # Only n_kv_head heads are cached; sliding layers of a transformers cache keep their last window only.
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, T_kept + T, hs)
        if isinstance(attention_mask, dict):  # generate()'s per-layer-type masks (static caches)
            attention_mask = attention_mask.get(self.layer_type)
        if attention_mask is not None and attention_mask.size(-1) > k.size(-2):
            # A mask built over the whole history; this layer's cache kept only the last keys.
            attention_mask = attention_mask[..., -k.size(-2) :]
        y = causal_attention(
            q,
            k,
            v,
            self.attn_type,
            self.n_positions,
            attention_mask=attention_mask,
            dropout_p=self.config.dropout if self.training else 0.0,
            implementation="eager" if self.config._attn_implementation == "eager" else "sdpa",
            sliding_window=self.sliding_window,
            sinks=self.sinks if self.config.attention_sinks else None,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# The MLP's activation by ``config.mlp_type``; gated ones read [gate | up] from a c_fc twice as wide.
def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation of GELU


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return F.relu(h).square()  # Primer (So et al. 2021), modded-nanogpt, nanochat


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up  # Shazeer 2020; Llama's down(silu(gate(x)) * up(x))


MLP_ACTIVATIONS = {"gelu": _gelu_tanh, "relu2": _relu2, "swiglu": _swiglu}
GATED_MLPS = ("swiglu",)


class GPT2AccelMLP(nn.Module):
    def __init__(self, config: GPT2AccelConfig):
        super().__init__()
        inner = config.mlp_hidden_size
        fc_out = 2 * inner if config.mlp_type in GATED_MLPS else inner
        self.c_fc = make_linear(config, config.n_embd, fc_out, config.mlp_bias)
        self.act = MLP_ACTIVATIONS[config.mlp_type]
        # magnitude preserving: divide by the activation's RMS over a unit normal input (EDM2's mp_silu)
        self.act_scale = 1 / MP_ACTIVATION_RMS[config.mlp_type] if config.magnitude_preserving else 1.0
        self.c_proj = make_linear(config, inner, config.n_embd, config.mlp_bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.c_fc(x))  # (B, T, inner)
        if self.act_scale != 1.0:
            x = x * self.act_scale
        return self.dropout(self.c_proj(x))  # (B, T, C)


class GPT2AccelBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block (GPT-2): x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Magnitude preserving: the sums become EDM2's blends mp_sum(x, branch, t) with t = ``mp_residual_balance``, so
    the residual stream keeps unit RMS instead of growing with depth (EDM2 Sec. 2.5, its encoder/decoder blocks).
    """

    def __init__(self, config: GPT2AccelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = GPT2AccelAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = GPT2AccelMLP(config)
        self.mp_balance = config.mp_residual_balance if config.magnitude_preserving else None

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | dict | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        a = self.attn(self.ln_1(x), attention_mask, cache, position_embeddings)  # (B, T, C)
        if self.mp_balance is not None:
            x = mp_sum(x, a, self.mp_balance)  # (B, T, C)
            return mp_sum(x, self.mlp(self.ln_2(x)), self.mp_balance)
        x = x + a  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT2AccelPreTrainedModel(PreTrainedModel):
    config_class = GPT2AccelConfig
    config: GPT2AccelConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2AccelBlock"]  # noqa: RUF012 -- a block must live on one device (accelerate's device_map)
    _skip_keys_device_placement = ["cache", "past_key_values"]  # noqa: RUF012
    _supports_sdpa = True
    _supports_flash_attn = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source (it looks for its AttentionInterface); our attention reads
        # config._attn_implementation on every forward, so set_attn_implementation("eager"/"sdpa") is safe.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if getattr(module, "forced_weight_norm", False):
            # EDM2 (Sec. 2.2): unit normal init, stored normalised (rows of unit RMS). transformers' copy_ skips a
            # weight loaded from a checkpoint, so reloading never re-normalises (its logits stay identical).
            w = module.weight
            init.normal_(w, mean=0.0, std=1.0)
            if hasattr(init, "copy_"):
                init.copy_(w, mp_normalize(w))
            else:  # pragma: no cover - transformers < 5
                w.copy_(mp_normalize(w))
            if getattr(module, "gain", None) is not None:
                init.ones_(module.gain)
            return
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_proj", False) and self.config.zero_init_output_proj:
                # modded-nanogpt: each block starts as the identity; its output projections learn from zero.
                init.zeros_(module.weight)
                if module.bias is not None:
                    init.zeros_(module.bias)
                return
            if getattr(module, "is_residual_proj", False):
                # GPT-2 paper (Radford et al. 2019, sec. 2.3): scale the weights of residual layers by 1/sqrt(N),
                # N = number of residual layers = 2 per block (attention and MLP).
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, GPT2AccelAttention) and self.config.attention_sinks:
            init.zeros_(module.sinks)  # sink logit 0: at first it weighs like one key with score 0


class GPT2AccelModel(GPT2AccelPreTrainedModel):
    """The transformer body: embeddings, blocks, final LayerNorm. Returns hidden states (B, T, C)."""

    def __init__(self, config: GPT2AccelConfig):
        super().__init__(config)
        emb = MPEmbedding if config.magnitude_preserving else nn.Embedding
        self.wte = emb(config.padded_vocab_size, config.n_embd)  # token embeddings (tied to lm_head)
        if config.position_embedding_type == "learned":
            self.wpe = emb(config.n_positions, config.n_embd)  # learned position embeddings
        else:
            self.wpe = None  # rotary: positions enter in attention
        if config.norm_after_embedding:
            self.ln_emb = make_norm(config, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([GPT2AccelBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = make_norm(config, config.n_embd)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """``cache`` (transformers >= 5.24) and ``past_key_values`` (its older name) are the same KV cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # The backward replay of a checkpointed block would append the same keys to the cache a second time.
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.size(1)
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the model's context n_positions={self.config.n_positions}; "
                "crop the input (generation: lower max_new_tokens or crop the prompt)"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).unsqueeze(0)  # (1, T)
        rope = None
        if self.wpe is not None and self.config.magnitude_preserving:
            # two unit-RMS embeddings blended with equal weights, as EDM2 joins its noise and class embeddings
            x = mp_sum(x, self.wpe(position_ids), 0.5)  # (B, T, C)
        elif self.wpe is not None:
            x = x + self.wpe(position_ids)  # (B, T, C)
        else:
            rope = rope_cos_sin(self.config, position_ids, x.dtype)  # 2 x (B or 1, T, hs)
        if self.config.norm_after_embedding:
            x = self.ln_emb(x)
        x = self.drop(x)  # (B, T, C)

        # None, or (B, 1, T, T_past + T) bool, or generate()'s {layer type: 4-D mask} for static caches
        mask = _attention_mask(attention_mask, T, past + T, x.device, self.config.sliding_window)
        fixed = _fixed_cache_length(cache)
        if fixed is not None:
            mask = _fixed_cache_mask(mask, past, T, fixed, x.device, self.config.sliding_window)

        all_hidden = () if output_hidden_states else None
        for block in self.h:
            if output_hidden_states:
                all_hidden += (x,)
            x = block(x, mask, cache, rope)
        x = self.ln_f(x)  # (B, T, C)
        if output_hidden_states:
            all_hidden += (x,)

        return_dict = return_dict if return_dict is not None else True
        if not return_dict:
            return tuple(t for t in (x, cache, all_hidden) if t is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=all_hidden, **{CACHE_FIELD: cache})


def _attention_mask(
    attention_mask: torch.Tensor | dict | None, t_q: int, t_k: int, device, sliding_window: int | None = None
) -> torch.Tensor | dict | None:
    """Turn a (B, T_past + T) padding mask (1 = token, 0 = padding) into a boolean (B, 1, Tq, Tk) mask.

    Returns None when nothing is padded, so attention takes its fastest purely causal path. Checking that costs
    one device-to-host sync per forward, so training on packed windows should pass ``attention_mask=None``.
    With a sliding window, returns ``{"full_attention": mask, "sliding_attention": mask & band}``, the layout of
    generate()'s per-layer-type masks. 4-D masks (and dicts of them) pass through: they already hold the rule.
    """
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        return {
            k: None if m is None else _attention_mask(m, t_q, t_k, device) for k, m in attention_mask.items()
        }
    if attention_mask.dim() == 4:
        # Already (B, 1, Tq, Tk) with causality included: generate() builds these for static (compilable) caches,
        # boolean (True = attend) for sdpa, additive (0 = attend) for eager.
        mask = attention_mask.to(device)
        mask = mask if mask.dtype == torch.bool else mask == 0
        return mask | ~mask.any(dim=-1, keepdim=True)
    if attention_mask.dim() != 2:
        raise ValueError(
            "attention_mask must be (batch, seq_len) of 0/1 or (batch, 1, q_len, kv_len), "
            f"got shape {tuple(attention_mask.shape)}"
        )
    keep = attention_mask[:, -t_k:].to(device=device, dtype=torch.bool)  # (B, Tk)
    if bool(keep.all()):
        return None
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    causal = torch.arange(t_k, device=device)[None, :] <= q_pos  # (Tq, Tk)
    mask = causal[None, None] & keep[:, None, None, :]  # (B, 1, Tq, Tk)
    # A padding query may see no key at all; let it see every key so softmax stays finite. Its output is never
    # used: real queries never attend to padding, and padded positions carry no loss.
    full = mask | ~mask.any(dim=-1, keepdim=True)
    if sliding_window is None:
        return full
    band = torch.arange(t_k, device=device)[None, :] > q_pos - sliding_window  # (Tq, Tk)
    sliding = mask & band[None, None]
    return {"full_attention": full, "sliding_attention": sliding | ~sliding.any(dim=-1, keepdim=True)}


def _fixed_cache_length(cache: Cache | None) -> int | None:
    """The key length a fixed-size cache (transformers' ``StaticCache``) returns from every update of a
    full-attention layer, or None for a cache that grows with the sequence (``DynamicCache``)."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    full = [
        layer for layer in getattr(cache, "layers", None) or [] if not getattr(layer, "is_sliding", False)
    ]
    return getattr(full[0], "max_cache_len", None) if full else None


def _fixed_cache_mask(
    mask: torch.Tensor | dict | None, past, t_q: int, t_k: int, device, sliding_window: int | None
) -> torch.Tensor | dict | None:
    """The full-attention layers' mask over a fixed-size cache's whole (t_k) buffer, whose unfilled slots hold zeros.

    generate() passes no mask for an unpadded prefill (transformers' sdpa mask builder leaves a purely causal mask
    to ``is_causal``), but a static cache returns all ``max_cache_len`` keys, so "the last Tq keys are the queries"
    no longer holds: the causal rule is spelled out (query i at position past + i sees keys 0..past + i). 4-D masks
    already over t_k pass through; masks from a 2-D padding mask over the filled keys are padded with False.
    Sliding-window layers keep what they were given (transformers' sliding static layers come with their masks).
    """
    if isinstance(mask, dict):
        return {
            k: _fixed_cache_mask(m, past, t_q, t_k, device, None) if k == "full_attention" else m
            for k, m in mask.items()
        }
    if sliding_window is not None:
        return {
            "full_attention": _fixed_cache_mask(mask, past, t_q, t_k, device, None),
            "sliding_attention": mask,
        }
    q_pos = (
        torch.arange(t_q, device=device)[:, None] + past
    )  # (Tq, 1) absolute positions (past may be a tensor)
    causal = (torch.arange(t_k, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if mask is None:
        return causal
    if mask.size(-1) < t_k:  # built from a 2-D padding mask over the filled keys only
        mask = F.pad(mask, (0, t_k - mask.size(-1)), value=False)
    return mask & causal


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight[:vocab_size].T`` without materialising the (N, V) logits.

    Forward walks ``chunk_rows`` rows at a time: the chunk's logits, their softmax, the loss terms, and (the loss
    being a scalar) the chunk's gradients right away: dlogits = softmax - onehot, dh = dlogits @ W and
    dW += dlogits^T @ h. Only dh (N, C) and dW (V_padded, C) are kept for backward, which scales them by the
    incoming gradient. The idea of Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989),
    written here for the padded, tied GPT-2 head. Rows whose target is -100 count nowhere; the padded weight rows
    (>= vocab_size) are outside the normaliser and get a zero gradient, so the loss and gradients equal those of
    the unpadded model. With ``softcap`` c the logits are c * tanh(z / c) (Gemma 2, nanochat) and the chain rule
    multiplies dlogits by 1 - tanh(z / c)^2.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_rows, need_grad, softcap=None):
        # h (N, C), weight (V_padded, C), targets (N,) with -100 = ignore
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype  # matmul dtype
        N, V = h.size(0), vocab_size
        with torch.autocast(dev, enabled=False):
            w = weight[:V].to(cdt)  # (V, C): the real rows; a view when no cast is needed
            valid = targets != -100  # (N,)
            # 1/n_valid on real rows, 0 on ignored ones, applied to (rows, C)-sized products, never to a
            # (rows, V) chunk. No target at all: 0/0 = nan, as F.cross_entropy gives.
            scale = valid.to(torch.float32) / valid.sum()  # (N,)
            tgt = targets.masked_fill(~valid, 0)  # (N,) any real id for ignored rows: their scale is 0
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            dh = torch.empty_like(h) if need_grad[0] else None  # (N, C)
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad[1] else None
            # Logits are computed transposed, (V, rows) = W @ h_c^T: on CPU (MKL) this product runs ~1.3x faster
            # than h_c @ W^T, and with the softmax as column reductions the whole chunk is ~10% faster
            # (benchmarks/bench_train_step.py --components). One buffer serves every chunk (no page faults).
            buf = torch.empty(V * min(chunk_rows, N), dtype=torch.float32, device=h.device)
            tbuf = torch.empty_like(buf) if softcap else None  # tanh(z / c), for the chain rule
            for s in range(0, N, chunk_rows):
                h_c = h[s : s + chunk_rows].to(cdt)  # (n, C)
                t_c, k_c = tgt[s : s + chunk_rows], scale[s : s + chunk_rows]  # (n,)
                n = h_c.size(0)
                cols = torch.arange(n, device=h.device)
                z = buf[: V * n].view(V, n)  # (V, n)
                if cdt == torch.float32:
                    torch.mm(w, h_c.T, out=z)
                else:  # low-precision matmul, fp32 softmax (the chunk is upcast, never the whole logits)
                    z.copy_(w @ h_c.T)
                if softcap:
                    tz = tbuf[: V * n].view(V, n)
                    torch.tanh(z.div_(softcap), out=tz)  # (V, n)
                    z.copy_(tz).mul_(softcap)  # capped logits
                z_t = z[t_c, cols]  # (n,) logit of each target
                m = z.amax(dim=0)  # (n,) column max, for a stable exp
                e = z.sub_(m).exp_()  # (V, n) exp(z - m), in place
                ssum = e.sum(dim=0)  # (n,)
                loss += ((ssum.log() + m - z_t) * k_c).sum()  # sum of scaled -log softmax[target]
                if dh is None and dw is None:
                    continue
                # dlogits^T = e / ssum - onehot; both terms are applied through (n, C) products so the (V, n)
                # chunk is never touched again: d = (e^T W) / ssum - W[target], dW += e (h / ssum) - onehot^T h.
                p_k = k_c / ssum  # (n,) row scale of the softmax term
                if softcap:
                    # d(capped)/dz = 1 - tanh^2: scales the softmax term elementwise and the onehot term per row.
                    g_t = 1 - (z_t / softcap).square()  # (n,)
                    e = e.mul_(tz.square_().neg_().add_(1))
                    k_c = k_c * g_t
                e = e.to(cdt)
                if dh is not None:
                    d = (e.T @ w).float().mul_(p_k[:, None])  # (n, C)
                    d -= w[t_c].float() * k_c[:, None]
                    dh[s : s + chunk_rows] = d
                if dw is not None:
                    hp = (h_c.float() * p_k[:, None]).to(cdt)  # (n, C)
                    if cdt == torch.float32:
                        dw[:V].addmm_(e, hp)  # (V, C) += (V, n) @ (n, C)
                    else:
                        dw[:V] += (e @ hp).float()
                    dw.index_add_(0, t_c, h_c.float() * -k_c[:, None])  # the -onehot term
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        gh = (dh * grad_loss).to(ctx.dtypes[0]) if dh is not None else None
        gw = (dw * grad_loss).to(ctx.dtypes[1]) if dw is not None else None
        return gh, gw, None, None, None, None, None


def chunked_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_rows: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (ignore_index -100) of ``h @ weight[:vocab_size].T`` (soft-capped at ``softcap``)
    against ``targets``, computed in row chunks so the (N, vocab_size) logits never exist. h (..., C),
    targets (...) -> scalar fp32 loss."""
    h2 = h.reshape(-1, h.size(-1))  # (N, C)
    need = (torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(
        h2, weight, targets.reshape(-1).to(h.device), vocab_size, chunk_rows, need, softcap
    )


class GPT2AccelForCausalLM(GPT2AccelPreTrainedModel, GenerationMixin):
    """GPT-2 with a language-modelling head (tied to the token embedding unless ``tie_word_embeddings=False``)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # noqa: RUF012

    def __init__(self, config: GPT2AccelConfig):
        super().__init__(config)
        self.transformer = GPT2AccelModel(config)
        if config.magnitude_preserving:
            # unit-norm rows (tied: the normalised embedding) times one learned gain, EDM2's out_gain. EDM2 starts
            # it at 0; here 1: the gain trains at learning_rate per step, and logits of RMS 1 start near ln(V)
            self.lm_head = MPLinear(config.n_embd, config.padded_vocab_size, learned_gain=True)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rows of hidden states per chunk of the skip_logits loss; its (vocab, rows) fp32 buffer is 103 MB at
        # 512 x 50257. 512-2048 were within 4% on CPU (docs/performance.md); smaller saves memory on GPUs.
        self.loss_chunk_rows = 512
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    # generate() runs greedy and sampled decoding (num_beams=1) in GenerationMixin._sample. A faster loop can be
    # plugged in from outside this file: importing gpt2_accel sets this to gpt2_accel.decode.fast_sample (a static
    # KV cache and no per-token forward(); docs/performance.md). It takes _sample's arguments and returns None for a
    # call it does not compute exactly (returned scores, padding, a cache passed in, training mode, a wrapped or
    # hooked layer...), and transformers' loop runs. `model.fast_sample = None` turns it off for one model.
    fast_sample = None

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):  # fmt: skip
        """transformers' greedy/sampling loop, or :attr:`fast_sample`'s where that one applies."""
        if self.fast_sample is not None:
            out = self.fast_sample(input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                                   streamer, **model_kwargs)  # fmt: skip
            if out is not None:
                return out
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)  # fmt: skip

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        skip_logits: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels`` follow transformers (shifted here; -100 is ignored). ``shift_labels`` are targets already
        aligned with the inputs (target t = next token after input t), as the trainer's packed windows give.
        ``skip_logits=True`` (with labels or shift_labels; Liger-Kernel's name) returns only the loss, computed
        by a chunked LM head + cross-entropy that never builds the (B, T, vocab) logits; ``logits`` is None."""
        if skip_logits and labels is None and shift_labels is None:
            raise ValueError("skip_logits=True returns only the loss: pass labels or shift_labels with it")
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        h = out.last_hidden_state  # (B, T, C)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]  # generation only needs the last position's logits
        loss = logits = None
        if labels is not None and shift_labels is None:
            # (B, T): the target of position t is label t + 1
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if skip_logits:
            # The weight is read here, inside forward, where FSDP2's root pre-forward hook has unsharded it. lm_head
            # itself is not called: it must not be its own FSDP unit, and ZeRO-3 must be told it is used here
            # (deepspeed.zero.register_external_parameter); see docs/performance.md.
            head = self.lm_head.mp_weight() if self.config.magnitude_preserving else self.lm_head.weight
            loss = chunked_linear_cross_entropy(
                h,
                head,
                shift_labels,
                self.config.vocab_size,
                self.loss_chunk_rows,
                self.config.final_logit_softcapping,
            )
        else:
            # The padded vocabulary rows (pad_vocab_size_multiple) make the matmul faster but are cut off here, so
            # a padded id can never be predicted, sampled or counted in the loss.
            logits = self.lm_head(h)[..., : self.config.vocab_size]  # (B, T, vocab_size)
            cap = self.config.final_logit_softcapping
            if cap:
                logits = cap * torch.tanh(logits / cap)  # Gemma 2 / nanochat: |logits| < cap
        if shift_labels is not None and not skip_logits:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                shift_labels.reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return_dict = return_dict if return_dict is not None else True
        cache = getattr(out, CACHE_FIELD)
        if not return_dict:
            rest = (logits, cache, out.hidden_states)  # logits None under skip_logits: dropped
            rest = tuple(t for t in rest if t is not None)
            return (loss, *rest) if loss is not None else rest
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: cache}
        )
