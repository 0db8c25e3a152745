"""GPT-2 architecture hyper-parameters: exactly what travels in ``config.json``.

Names follow GPT-2 (``n_layer``, ``n_head``, ``n_embd``, ``n_positions``) and transformers' standard names
(``hidden_size``, ``num_attention_heads``...) map onto them through ``attribute_map``.
This file imports transformers and its sibling ``attention.py`` (which imports only torch, never this file): both
are copied next to the weights for ``trust_remote_code`` users, where the relative import still resolves.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from .attention import parse_attn_type


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
        **kwargs,
    ):
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if pad_vocab_size_multiple < 1:
            raise ValueError(f"pad_vocab_size_multiple must be >= 1, got {pad_vocab_size_multiple}")
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.dropout = dropout
        self.bias = bias
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

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m
