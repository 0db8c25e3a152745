"""Fast autoregressive decoding for :class:`GPT2AccelForCausalLM`: what ``gpt2-accel sample`` runs.

At batch 1 a decoded token reads every weight once, so the floor is (bytes of weights) / (memory bandwidth)
(benchmarks/bench_generate.py measures both). transformers' ``generate()`` adds per-token Python (logits
processors, stopping criteria, input preparation, a growing ``DynamicCache``) that is a large share of a
small model's step. This loop keeps only the work:

* a static KV cache: one (B, n_head, prompt + new, head_dim) buffer per layer, written in place (no concat);
* the blocks' LayerNorms and :func:`causal_attention`, so every attention variant decodes as the forward does;
* every matrix (the LM head and the blocks' Linear layers) as ``x @ W^T`` with ``W^T`` stored (in, out)
  contiguous: on this 2-core CPU the (50304 x 384) head's matrix-vector product through ``F.linear`` ran ~1.8x
  slower than ``torch.mm`` with the transposed copy (interleaved, best of 5). The copies double the weights'
  memory while sampling;
* on CUDA, ``compile=True`` compiles the one-token step over the full-length buffer (a fixed shape, keys past the
  current position masked) with CUDA graphs (``mode="reduce-overhead"``), the known lever for small-batch GPU
  decoding (gpt-fast, PyTorch blog 2023).

Sampling follows ``generate()``'s order and conventions: temperature, then top-k, then top-p (the smallest set of
likeliest tokens whose mass reaches top_p, the most likely always kept), then one ``torch.multinomial`` draw.
Greedy (``temperature == 0``) tokens equal ``generate()``'s (tests/test_sample.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import causal_attention


def supports_fast_decoding(model) -> bool:
    """True for our model class when this decoder computes exactly its forward; others use ``generate()``.

    The decoder re-expresses the GPT-2 block (LayerNorm, attention with learned positions, GELU MLP); a model
    built with other architecture options would decode wrongly, so a 4-token prompt and one cached step are
    checked against the model's own forward (two tiny forwards) before it is trusted.
    """
    from .convert import _blockers
    from .modeling_gpt2_accel import GPT2AccelForCausalLM

    # By name, not isinstance: with trust_remote_code, some transformers releases (5.4) load the copy of our modeling file
    # saved next to the weights (the same code as another class object); the check below guards the rest.
    ours = type(model).__name__ == GPT2AccelForCausalLM.__name__ and model.config.model_type == "gpt2_accel"
    if not ours or model.config.n_positions < 5:
        return False
    if [b for b in _blockers(model.config, "gpt2") if not b.startswith("attn_type=")]:
        return False  # a modern block option (rotary, RMSNorm, GQA...): generate() handles it
    try:
        return Decoder(model).agrees_with_model()
    except Exception:  # an architecture option the decoder does not know (a missing module, another shape)
        return False


class Decoder:
    """Greedy or sampled continuation of a batch of equal-length prompts with a static KV cache."""

    def __init__(self, model, *, compile: bool = False, static: bool | None = None):
        """``compile`` (CUDA only) compiles the fixed-shape step with CUDA graphs; ``static`` forces the
        fixed-shape step without compiling (default: only when compiling)."""
        self.model = model.eval()
        self.cfg = model.config
        self.t = model.transformer
        # (n_embd, vocab_size): the head's real rows only, transposed once (see module docstring).
        self.head_t = model.lm_head.weight[: self.cfg.vocab_size].detach().t().contiguous()
        # The blocks' Linear layers, transposed the same way: (in, out) weights for torch.addmm.
        self.lin = [
            {name: _transposed(getattr(block.attn, n) if "attn" in name else getattr(block.mlp, n))
             for name, n in (("attn_qkv", "c_attn"), ("attn_out", "c_proj"), ("mlp_in", "c_fc"), ("mlp_out", "c_proj"))}
            for block in self.t.h
        ]  # fmt: skip
        compile = compile and next(model.parameters()).device.type == "cuda"
        self.static = compile if static is None else (static or compile)
        self.step = self._step_static if self.static else self._step
        if compile:
            self.step = torch.compile(self._step_static, mode="reduce-overhead", fullgraph=True)

    # -------------------------------------------------------------------------------------------- the network
    def _blocks(self, x: torch.Tensor, start: int, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Run positions [start, end) (x: (B, T, C)) through the blocks, writing their keys/values to the cache."""
        B, T, C = x.shape
        nh = self.cfg.n_head
        hs = C // nh
        impl = "eager" if self.cfg._attn_implementation == "eager" else "sdpa"
        for i, block in enumerate(self.t.h):
            lin = self.lin[i]
            q, k, v = _linear(block.ln_1(x), lin["attn_qkv"]).split(C, dim=2)  # 3 x (B, T, C)
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            self.k[i][:, :, start:end] = k.view(B, T, nh, hs).transpose(1, 2)
            self.v[i][:, :, start:end] = v.view(B, T, nh, hs).transpose(1, 2)
            kv_end = self.k[i].size(2) if mask is not None else end
            y = causal_attention(
                q,
                self.k[i][:, :, :kv_end],
                self.v[i][:, :, :kv_end],
                self.cfg.attn_type,
                self.cfg.n_positions,
                attention_mask=mask,
                implementation=impl,
            )  # (B, nh, T, hs)
            x = x + _linear(y.transpose(1, 2).reshape(B, T, C), lin["attn_out"])
            x = x + _mlp(block.ln_2(x), lin)
        return self.t.ln_f(x)  # (B, T, C)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.mm(h, self.head_t.to(h.dtype))  # (B, C) @ (C, V) -> (B, V)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.size(1)
        pos = torch.arange(T, device=ids.device)
        x = self.t.wte(ids) + self.t.wpe(pos)  # (B, T, C)
        return self._logits(self._blocks(x, 0, T, None)[:, -1])  # (B, V)

    def _step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """One new token per row (tok: (B, 1)) at position ``pos``; keys up to ``pos`` (sliced cache)."""
        x = self.t.wte(tok) + self.t.wpe.weight[pos]  # (B, 1, C)
        return self._logits(self._blocks(x, pos, pos + 1, None)[:, -1])

    def _step_static(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """As :meth:`_step` with every shape fixed (for compilation): all cache slots, later ones masked."""
        x = self.t.wte(tok) + self.t.wpe(pos)[None, None]  # (B, 1, C)
        n = self.k[0].size(2)
        mask = (torch.arange(n, device=tok.device) <= pos)[None, None, None, :]  # (1, 1, 1, N)
        B, _, C = x.shape
        nh = self.cfg.n_head
        hs = C // nh
        for i, block in enumerate(self.t.h):
            lin = self.lin[i]
            q, k, v = _linear(block.ln_1(x), lin["attn_qkv"]).split(C, dim=2)
            q = q.view(B, 1, nh, hs).transpose(1, 2)
            self.k[i].index_copy_(2, pos[None], k.view(B, 1, nh, hs).transpose(1, 2))
            self.v[i].index_copy_(2, pos[None], v.view(B, 1, nh, hs).transpose(1, 2))
            y = causal_attention(
                q, self.k[i], self.v[i], self.cfg.attn_type, self.cfg.n_positions, attention_mask=mask
            )
            x = x + _linear(y.transpose(1, 2).reshape(B, 1, C), lin["attn_out"])
            x = x + _mlp(block.ln_2(x), lin)
        return self._logits(self.t.ln_f(x)[:, -1])

    @torch.inference_mode()
    def agrees_with_model(self, atol: float = 1e-3) -> bool:
        """Do the prefill and one cached step give the model's own logits (a random 5-token sequence)?"""
        dev = self.t.wte.weight.device
        ids = torch.randint(0, self.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0)).to(
            dev
        )
        want = self.model(ids, use_cache=False).logits[0, -2:].float()  # (2, V)
        self._alloc(1, 5)
        got = torch.stack([self._prefill(ids[:, :4])[0], self._step(ids[:, 4:], 4)[0]]).float()
        return bool(torch.allclose(got, want, atol=atol, rtol=1e-3))

    def _alloc(self, batch: int, total: int) -> None:
        w = self.t.wte.weight
        shape = (batch, self.cfg.n_head, total, self.cfg.n_embd // self.cfg.n_head)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.t.h]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.t.h]

    # -------------------------------------------------------------------------------------------- the loop
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        streamer=None,
    ) -> torch.Tensor:
        """(B, T) prompt -> (B, T + max_new_tokens). Sampling draws from torch's global RNG (seed it first)."""
        B, T = input_ids.shape
        total = T + max_new_tokens
        if total > self.cfg.n_positions:
            raise ValueError(
                f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the context n_positions="
                f"{self.cfg.n_positions}"
            )
        self._alloc(B, total)
        out = torch.empty(B, total, dtype=torch.long, device=input_ids.device)
        out[:, :T] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self._prefill(input_ids)
        for i in range(max_new_tokens):
            tok = _choose(logits, temperature, top_k, top_p)  # (B,)
            out[:, T + i] = tok
            if streamer is not None:
                streamer.put(tok.cpu())
            if i == max_new_tokens - 1:
                break
            pos = T + i
            arg = torch.tensor(pos, device=tok.device) if self.static else pos
            logits = self.step(tok[:, None], arg)
        if streamer is not None:
            streamer.end()
        return out


def _transposed(layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = layer.weight.detach().t().contiguous()  # (in, out)
    return w, (layer.bias.detach() if layer.bias is not None else None)


def _linear(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """``F.linear`` with an (in, out) weight: (..., in) -> (..., out)."""
    w, b = wb
    x2 = x.reshape(-1, x.size(-1))
    y = torch.addmm(b, x2, w) if b is not None else torch.mm(x2, w)
    return y.view(*x.shape[:-1], w.size(1))


def _mlp(x: torch.Tensor, lin: dict) -> torch.Tensor:
    """GPT-2's MLP (GPT2AccelMLP.forward) through the transposed weights."""
    return _linear(F.gelu(_linear(x, lin["mlp_in"]), approximate="tanh"), lin["mlp_out"])


def _choose(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax, or a draw after temperature, top-k and top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(
            logits, descending=False
        )  # ascending, as transformers' TopPLogitsWarper
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[:, -1] = False  # always keep the likeliest token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]
