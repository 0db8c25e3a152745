"""GPT-2 architecture hyper-parameters: exactly what travels in ``config.json``.

Names follow GPT-2 (``n_layer``, ``n_head``, ``n_embd``, ``n_positions``) and transformers' standard names
(``hidden_size``, ``num_attention_heads``...) map onto them through ``attribute_map``.
This file imports transformers and its sibling ``attention.py`` (which imports only torch, never this file): both
are copied next to the weights for ``trust_remote_code`` users, where the relative import still resolves.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .attention import parse_attn_type

# Architecture choices. Each tuple is the complete list of values a config may name; a new variant (issue 17's
# magnitude-preserving option, say) adds its name here and its module in modeling_gpt2_accel.py.
POSITION_EMBEDDING_TYPES = ("learned", "rope")
NORM_TYPES = ("layernorm", "rmsnorm")
MLP_TYPES = ("gelu", "swiglu", "relu2")
LAYER_TYPES = (
    "full_attention",
    "sliding_attention",
)  # transformers' names (configuration_utils.ALLOWED_ATTN_LAYER_TYPES)
# YaRN keys we implement, with transformers' names (modeling_rope_utils._compute_yarn_parameters).
YARN_KEYS = (
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "truncate",
    "attention_factor",
)


def check_attn_type(attn_type: str) -> str:
    """Return ``attn_type`` if it names a known form, else raise a ValueError listing the valid forms.

    Delegates to the attention module's own parser, so the config rejects exactly what a forward would reject
    (an unknown ``PA_<activation>`` included) at construction instead of at the first forward.
    """
    parse_attn_type(attn_type)
    return attn_type


class GPT2AccelConfig(PretrainedConfig):
    """Configuration of :class:`GPT2AccelForCausalLM` (GPT-2 with optional research attention variants).

    Args:
        vocab_size: number of real tokens (50257 for GPT-2's BPE). Ids >= vocab_size never appear in the logits.
        n_positions: context length (learned position embeddings).
        n_embd: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads per block (``n_embd`` must be divisible by it).
        n_inner: MLP hidden width; ``None`` means 4 * n_embd as in GPT-2.
        dropout: dropout on embeddings, attention weights and residual branches (GPT-2 used 0.1; 0 for pretraining
            as in nanoGPT).
        bias: use biases in Linear and LayerNorm layers (GPT-2: True).
        layer_norm_epsilon: LayerNorm epsilon (GPT-2: 1e-5).
        initializer_range: std of the normal init (GPT-2: 0.02).
        attn_type: ``SM`` (softmax), ``GK``, ``GKpoly-<n>`` or ``PA_<activation>`` (see ``gpt2_accel.attention``).
        pad_vocab_size_multiple: pad the embedding matrix to a multiple of this (nanoGPT's 50304 = 64 * 786) for
            faster matmuls; padded rows are never predicted because logits are cut to ``vocab_size``.
        position_embedding_type: ``learned`` (GPT-2's table ``wpe``) or ``rope`` (rotary, Su et al. 2021,
            arXiv:2104.09864; no position parameters).
        rope_theta: rotary base wavelength (10000 as in RoFormer/Llama; gpt-oss uses 150000).
        rope_scaling: ``None`` or YaRN (Peng et al. 2023, arXiv:2309.00071) as gpt-oss configures it:
            ``{"rope_type": "yarn", "factor": 32, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "truncate": False}``. Stored, as transformers 5 does, in ``rope_parameters``.
        norm_type: ``layernorm`` (GPT-2) or ``rmsnorm`` (Zhang & Sennrich 2019, arXiv:1910.07467).
        norm_elementwise_affine: learned scale (and LayerNorm bias) in every norm; False = parameter-free, as
            nanochat.
        norm_after_embedding: normalise the token embedding before the first block (nanochat).
        mlp_type: ``gelu`` (GPT-2, tanh approximation), ``swiglu`` (Shazeer 2020, arXiv:2002.05202; ``c_fc``
            holds gate | up) or ``relu2`` (So et al. 2021 "Primer", arXiv:2109.08668; modded-nanogpt, nanochat).
            ``n_inner`` defaults to 4 * n_embd, and for swiglu to 8/3 * n_embd rounded up to a multiple of 64
            (the same parameter count as GPT-2's MLP, as in Llama).
        n_kv_head: key/value heads (grouped-query attention, Ainslie et al. 2023, arXiv:2305.13245); ``None`` =
            n_head (multi-head), 1 = multi-query. The KV cache holds n_kv_head heads.
        qk_norm: normalise each query and key head (norm_type, over head_dim) before the rotary embedding, as
            Qwen3 (Dehghani et al. 2023, arXiv:2302.05442).
        attention_bias / mlp_bias: biases of the attention (c_attn, c_proj) / MLP Linear layers; ``None`` = ``bias``.
        sliding_window: keys per query (itself included) in ``sliding_attention`` layers (Beltagy et al. 2020,
            Longformer; Mistral, gpt-oss); ``None`` = every layer attends to all earlier tokens.
        layer_types: one of ``full_attention`` / ``sliding_attention`` per layer; ``None`` = every layer slides
            when ``sliding_window`` is set (Mistral), else every layer is full.
        attention_sinks: a learned logit per head added to every softmax normaliser, as gpt-oss (Xiao et al. 2023,
            arXiv:2309.17453; OpenAI 2025). Softmax attention only.
        final_logit_softcapping: ``cap * tanh(logits / cap)`` on the output logits (Gemma 2; nanochat uses 15).
        zero_init_output_proj: initialise the attention and MLP output projections (``c_proj``) to zero
            (modded-nanogpt), instead of GPT-2's 1/sqrt(2 n_layer) scaled normal.
        magnitude_preserving: EDM2's magnitude-preserving network (Karras et al. 2023, "Analyzing and Improving the
            Training Dynamics of Diffusion Models", arXiv:2312.02696): every matrix (and the embedding) is used
            through its row-normalised form, and its stored rows are re-normalised after each optimizer step (the
            trainer does it, from outside the model: ``gpt2_accel.optim.attach_forced_weight_norm``); residual sums
            are ``mp_sum`` blends, activations are divided by their RMS over a unit normal input, there are no
            biases and no norm gains, and the logits have one learned gain (``lm_head.gain``). Needs
            ``bias=False`` and ``norm_elementwise_affine=False``.
        mp_residual_balance: the blend ``t`` of the residual ``mp_sum(x, branch, t)`` (EDM2's ``res_balance`` and
            ``attn_balance``: 0.3). magnitude_preserving only.
        bos_token_id / eos_token_id: default to the last id, ``vocab_size - 1``: that is ``<|endoftext|>`` = 50256
            for GPT-2's BPE and 256 for the character tokenizer, and it keeps tiny test vocabularies valid
            (transformers warns about special ids outside the vocabulary).
    """

    model_type = "gpt2_accel"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # noqa: RUF012 (transformers API)
    attribute_map = {  # noqa: RUF012 (transformers API)
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
        "num_key_value_heads": "n_kv_head",
        "rms_norm_eps": "layer_norm_epsilon",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        attn_type: str = "SM",
        pad_vocab_size_multiple: int = 1,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        position_embedding_type: str = "learned",
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        norm_type: str = "layernorm",
        norm_elementwise_affine: bool = True,
        norm_after_embedding: bool = False,
        mlp_type: str = "gelu",
        n_kv_head: int | None = None,
        qk_norm: bool = False,
        attention_bias: bool | None = None,
        mlp_bias: bool | None = None,
        sliding_window: int | None = None,
        layer_types: list[str] | None = None,
        attention_sinks: bool = False,
        final_logit_softcapping: float | None = None,
        zero_init_output_proj: bool = False,
        magnitude_preserving: bool = False,
        mp_residual_balance: float = 0.3,
        **kwargs,
    ):
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple must be >= 1, got {pad_vocab_size_multiple}")
        self.position_embedding_type = _choice(
            "position_embedding_type", position_embedding_type, POSITION_EMBEDDING_TYPES
        )
        rope = _rope_parameters(
            position_embedding_type, rope_theta, rope_scaling, rope_parameters, n_embd // n_head
        )
        self.norm_type = _choice("norm_type", norm_type, NORM_TYPES)
        self.norm_elementwise_affine = bool(norm_elementwise_affine)
        self.norm_after_embedding = bool(norm_after_embedding)
        self.mlp_type = _choice("mlp_type", mlp_type, MLP_TYPES)
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_kv_head < 1 or n_head % n_kv_head != 0:
            divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
            raise ValueError(
                f"n_kv_head={n_kv_head}: n_head={n_head} must be divisible by n_kv_head (each key/value head serves "
                f"n_head / n_kv_head query heads); valid values: {divisors}"
            )
        self.n_kv_head = n_kv_head
        self.qk_norm = bool(qk_norm)
        self.attention_bias = bias if attention_bias is None else bool(attention_bias)
        self.mlp_bias = bias if mlp_bias is None else bool(mlp_bias)
        self.sliding_window, self.layer_types = _local_attention(sliding_window, layer_types, n_layer)
        self.attention_sinks = bool(attention_sinks)
        if final_logit_softcapping is not None and not final_logit_softcapping > 0:
            raise ValueError(
                f"final_logit_softcapping={final_logit_softcapping} must be a positive cap (nanochat: 15, Gemma 2: 30) "
                "or None for no capping"
            )
        self.final_logit_softcapping = final_logit_softcapping
        self.zero_init_output_proj = bool(zero_init_output_proj)
        self.magnitude_preserving = bool(magnitude_preserving)
        self.mp_residual_balance = float(mp_residual_balance)
        _check_composition(attn_type, self)
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.dropout = dropout
        self.bias = bias
        _check_magnitude_preserving(self)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.attn_type = check_attn_type(attn_type)
        self.pad_vocab_size_multiple = pad_vocab_size_multiple
        self.use_cache = use_cache
        if bos_token_id is None:
            bos_token_id = vocab_size - 1
        if eos_token_id is None:
            eos_token_id = vocab_size - 1
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set after the base class: transformers 5 rewrites a `rope_parameters` attribute it finds during __init__.
        self.rope_parameters = rope

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        """MLP hidden width: ``n_inner``, else 4 * n_embd (8/3 * n_embd rounded up to 64 for the gated SwiGLU)."""
        if self.n_inner:
            return self.n_inner
        if self.mlp_type == "swiglu":
            return (8 * self.n_embd // 3 + 63) // 64 * 64
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


def _choice(key: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"{key}={value!r} is not known; valid values: {', '.join(valid)}")
    return value


def _rope_parameters(
    position_embedding_type: str,
    rope_theta: float | None,
    rope_scaling: dict | None,
    rope_parameters: dict | None,
    head_dim: int,
) -> dict | None:
    """transformers 5 keeps every rotary setting in one ``rope_parameters`` dict (``rope_type``, ``rope_theta``,
    YaRN's keys); ``rope_theta`` and ``rope_scaling`` are the names gpt-oss and older configs use. Returns None
    for learned positions."""
    if position_embedding_type != "rope":
        for key, value in (("rope_scaling", rope_scaling), ("rope_theta", rope_theta)):
            if value is not None:
                raise ValueError(
                    f"{key} is set but position_embedding_type={position_embedding_type!r}: rotary settings need "
                    "position_embedding_type='rope' (or drop the key)"
                )
        if rope_parameters:  # a saved config of a learned-position model may carry None / {}
            raise ValueError("rope_parameters is set but position_embedding_type is not 'rope'")
        return None
    if head_dim % 2:
        raise ValueError(
            f"position_embedding_type='rope' needs an even head size, got n_embd/n_head={head_dim}"
        )
    params = dict(rope_parameters or {})
    if rope_scaling:
        params.update(rope_scaling)
    params.pop("type", None) if "rope_type" in params else params.setdefault(
        "rope_type", params.pop("type", "default")
    )
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    params.setdefault("rope_theta", 10000.0)
    if params["rope_type"] == "default":
        extra = sorted(set(params) - {"rope_type", "rope_theta"})
        if extra:
            raise ValueError(
                f"rope_scaling keys {extra} need rope_type='yarn' (the only scaling implemented)"
            )
    elif params["rope_type"] == "yarn":
        unknown = sorted(set(params) - set(YARN_KEYS) - {"rope_theta"})
        if unknown:
            raise ValueError(f"rope_scaling: unknown YaRN keys {unknown}; valid keys: {', '.join(YARN_KEYS)}")
        for key in ("factor", "original_max_position_embeddings"):
            if not isinstance(params.get(key), int | float) or params[key] <= 0:
                raise ValueError(
                    f"rope_scaling with rope_type='yarn' needs a positive {key!r}, got {params.get(key)!r} "
                    "(gpt-oss: factor=32, original_max_position_embeddings=4096)"
                )
    else:
        raise ValueError(
            f"rope_scaling rope_type={params['rope_type']!r} is not implemented; valid values: default, yarn"
        )
    return params


def _local_attention(sliding_window: int | None, layer_types: list[str] | None, n_layer: int):
    """Validate ``sliding_window`` and ``layer_types``; a window without a pattern slides in every layer."""
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive number of keys, or None")
    if layer_types is None:
        # Always a list: transformers' cache and mask builders read `layer_types` whenever the attribute exists.
        kind = "full_attention" if sliding_window is None else "sliding_attention"
        return sliding_window, [kind] * n_layer
    layer_types = list(layer_types)
    if len(layer_types) != n_layer:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries but n_layer={n_layer}: give one of "
            f"{', '.join(LAYER_TYPES)} per layer"
        )
    bad = sorted({t for t in layer_types if t not in LAYER_TYPES})
    if bad:
        raise ValueError(f"layer_types contains {bad}; valid values: {', '.join(LAYER_TYPES)}")
    if "sliding_attention" in layer_types and sliding_window is None:
        raise ValueError(
            "layer_types has 'sliding_attention' layers but sliding_window is None: set sliding_window"
        )
    return sliding_window, layer_types


def _check_composition(attn_type: str, config: GPT2AccelConfig) -> None:
    """Refuse the options that the chosen attention variant cannot express, naming both sides of the conflict.

    Every variant can be masked (sliding windows: a masked key contributes exactly 0 to GK, GKpoly and PA as to
    softmax; see attention.py), take rotated or normalised queries and keys, and share key/value heads. A sink is
    an extra logit in softmax's normaliser: GK, GKpoly and PA are unnormalised sums and have no normaliser to add
    it to.
    """
    kind, _ = parse_attn_type(attn_type)
    if config.attention_sinks and kind != "SM":
        raise ValueError(
            f"attention_sinks=True conflicts with attn_type={attn_type!r}: a sink adds a logit to softmax's "
            "normaliser and this variant has none; use attn_type='SM' or attention_sinks=False"
        )


def _check_magnitude_preserving(config: GPT2AccelConfig) -> None:
    """Refuse what would break EDM2's magnitude preservation, naming the key and the fix.

    A bias adds a term whose size nothing controls, and a learned norm gain (or LayerNorm bias) rescales the
    activations freely: EDM2 removes both (Sec. 2.2, Config C/D). A zero matrix has no direction to normalise
    (its forced weight normalisation divides 0 by eps for ever), so zero-initialised projections cannot be used.
    """
    if not 0 < config.mp_residual_balance < 1:
        raise ValueError(
            f"mp_residual_balance={config.mp_residual_balance} must be in (0, 1): it is the blend t of "
            "mp_sum(x, branch, t) (EDM2: 0.3)"
        )
    if not config.magnitude_preserving:
        return
    which = [f"{k}=True" for k in ("attention_bias", "mlp_bias") if getattr(config, k)]
    if config.bias and config.norm_type == "layernorm" and config.norm_elementwise_affine:
        which.append("the LayerNorm's learned bias (bias=True with norm_elementwise_affine=True)")
    if which:
        raise ValueError(
            f"magnitude_preserving=True conflicts with biases ({'; '.join(which)}; bias=True sets them all): EDM2 "
            "removes every bias, whose size nothing keeps at 1. Set bias=False (and leave attention_bias/mlp_bias "
            "unset or False)"
        )
    if config.norm_elementwise_affine:
        raise ValueError(
            f"magnitude_preserving=True conflicts with norm_elementwise_affine=True ({config.norm_type} with a learned "
            "gain): a learned norm gain rescales the activations freely. Set norm_elementwise_affine=False (the "
            "logits keep one learned output gain)"
        )
    if config.zero_init_output_proj:
        raise ValueError(
            "magnitude_preserving=True conflicts with zero_init_output_proj=True: a zero matrix has no direction "
            "to normalise. Set zero_init_output_proj=False"
        )
