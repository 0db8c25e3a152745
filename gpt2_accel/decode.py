"""Fast autoregressive decoding for :class:`GPT2AccelForCausalLM`: what ``gpt2-accel sample`` runs.

At batch 1 a decoded token reads every weight once, so the floor is (bytes of weights) / (memory bandwidth)
(benchmarks/bench_generate.py measures both). transformers' ``generate()`` adds per-token Python (logits
processors, stopping criteria, input preparation, a growing ``DynamicCache``) that is a large share of a
small model's step. This loop keeps only the work:

* a static KV cache: one (B, n_head, prompt + new, head_dim) buffer per layer, written in place (no concat);
* on CPU in fp32 or int8, with softmax attention and up to :data:`gpt2_accel.gemv.MAX_ROWS` prompts, the
  one-token step's blocks run in ONE call of :mod:`gpt2_accel.gemv`'s kernel (``decode_step``): per layer
  LayerNorm, the qkv product, this position's keys/values written into the cache, one query per head against
  the cached keys (softmax in fp32, scale 1/sqrt(head_dim), as :func:`causal_attention`'s ``"SM"``), the output
  product and residual, LayerNorm, the MLP with GPT-2's tanh GELU, residual; then ln_f. Op by op the step
  dispatched ~20 torch ops per layer (SDPA's CPU flash kernel ~0.19 ms a one-query call, profiled), ~1.5-3 ms of
  a ~12 ms token at the reference shape; fused, the blocks cost about their bytes read (docs/performance.md);
* otherwise (the prompt, other attention variants or norms, ``fused=False``, no kernel) the blocks' LayerNorms
  and :func:`causal_attention`, so every attention variant decodes as the forward does;
* on CPU, the blocks' Linear layers for a few rows of input (one decoded token per prompt, up to
  :data:`gpt2_accel.gemv.MAX_ROWS` prompts), and the LM head from 2 rows on, go through :mod:`gpt2_accel.gemv`'s
  kernel, which reads each weight row once in ``nn.Linear``'s own layout; longer inputs (the prompt) go through
  torch. The head for one row, and every matrix where the kernel cannot be built (or ``kernel=False``), is
  ``x @ W^T`` with ``W^T`` stored (in, out) contiguous: on the 2-core development CPU the (50304 x 384) head's
  matrix-vector product through ``F.linear`` ran ~1.8x slower than ``torch.mm`` with the transposed copy, and
  ~2x faster than the kernel (which wins on the blocks' matrices, which stay in cache, and on 2-32 rows,
  where MKL's small-M product is 4-8x slower than one row; docs/performance.md). On a GPU every matrix is
  ``F.linear`` on the weights themselves: cuBLAS reads the (out, in) layout as it is, and a copy would double the
  weights' memory;
* optionally (``quantize="int8"``, CPU) weight-only int8: every matrix stored as int8 with one fp32 scale per
  output row (:func:`gpt2_accel.gemv.quantize_int8`), a quarter of the bytes to read per token; activations,
  LayerNorms, attention and the KV cache stay fp32. Greedy tokens then follow the quantised model, which is
  close to the fp32 one, not equal (tests/test_decode_fast.py bounds the difference);
* on CUDA, ``compile=True`` compiles the one-token step over the full-length buffer (a fixed shape, keys past the
  current position masked) with CUDA graphs (``mode="reduce-overhead"``), the known lever for small-batch GPU
  decoding (gpt-fast, PyTorch blog 2023).

Sampling follows ``generate()``'s order and conventions: temperature, then top-k, then top-p (the smallest set of
likeliest tokens whose mass reaches top_p, the most likely always kept), then one ``torch.multinomial`` draw.
Greedy (``temperature == 0``) tokens equal ``generate()``'s (tests/test_sample.py, tests/test_decode_fast.py):
the kernel sums in another order than torch's BLAS, so logits differ by fp32 rounding (~1e-6 relative; the
fused step is tested within 1e-5 of the logits' scale of a float64 forward), which changes a greedy token only
where the two likeliest logits tie to that precision.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from . import gemv
from .attention import causal_attention

logger = logging.getLogger(__name__)

QUANTIZE = (None, "int8")
"""Weight formats :class:`Decoder` decodes with (``None`` = the model's own weights)."""


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
    if not _plain_layers(model):
        return False
    try:
        return Decoder(model).agrees_with_model()
    except Exception:  # an architecture option the decoder does not know (a missing module, another shape)
        return False


def _plain_layers(model) -> bool:
    """Is every layer the decoder reads the plain class it re-expresses, with no hooks? A PEFT adapter (its
    ``weight`` is the base layer's), a quantised layer, accelerate's offload hook or a user's forward hook makes the
    model compute something the decoder would not."""
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in model.modules()):
        return False
    t = model.transformer
    layers = [model.lm_head, t.wte, t.wpe]
    for b in t.h:
        layers += [b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj]
    return all(type(m) in (torch.nn.Linear, torch.nn.Embedding) for m in layers)


class Decoder:
    """Greedy or sampled continuation of a batch of equal-length prompts with a static KV cache."""

    def __init__(
        self,
        model,
        *,
        compile: bool = False,
        static: bool | None = None,
        quantize: str | None = None,
        kernel: bool = True,
        fused: bool = True,
    ):
        """``compile`` (CUDA only) compiles the fixed-shape step with CUDA graphs; ``static`` forces the
        fixed-shape step without compiling (default: only when compiling). ``quantize="int8"`` (CPU, fp32 models)
        decodes with weight-only int8 matrices. ``kernel=False`` keeps torch's matrix products on CPU (the path
        taken anyway where :mod:`gpt2_accel.gemv`'s kernel cannot be built). ``fused=False`` keeps the
        one-token step op by op even where the kernel's fused step applies (softmax attention, up to
        :data:`gpt2_accel.gemv.MAX_ROWS` prompts)."""
        self.model = model.eval()
        self.cfg = model.config
        self.t = model.transformer
        w = model.lm_head.weight
        on_cpu_fp32 = w.device.type == "cpu" and w.dtype == torch.float32
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        if quantize and not on_cpu_fp32:
            raise ValueError(
                f"quantize={quantize!r} decodes fp32 weights on the CPU; this model is {w.dtype} on {w.device}. "
                "Load it in float32 on the CPU (gpt2-accel sample --device cpu --dtype float32), or leave "
                "quantization off"
            )
        self.kernel = gemv.kernel() if (on_cpu_fp32 and (kernel or quantize)) else None
        if quantize and self.kernel is None:
            raise ValueError(
                f"quantize={quantize!r} needs gpt2_accel.gemv's CPU kernel, which could not be built here (see the "
                "warning above: it needs g++, ninja and an AVX2 CPU); decode without quantization instead"
            )
        self.quantize = quantize
        # The head's real rows only (vocab_size of the padded rows), then the blocks' Linear layers.
        # fp32 keeps the head's (in, out) copy even with the kernel: for one row, MKL's x @ W^T streamed the 77 MB
        # head of the reference shape faster than the kernel (the blocks' matrices, which stay in cache, and
        # 2-32 rows go faster through the kernel; docs/performance.md).
        on_cpu = w.device.type == "cpu"
        self.head = _Matrix(w[: self.cfg.vocab_size], None, quantize, transpose=on_cpu)
        self.lin = [
            {name: _Matrix.of(getattr(block.attn, n) if "attn" in name else getattr(block.mlp, n), quantize,
                              transpose=on_cpu and self.kernel is None)
             for name, n in (("attn_qkv", "c_attn"), ("attn_out", "c_proj"), ("mlp_in", "c_fc"), ("mlp_out", "c_proj"))}
            for block in self.t.h
        ]  # fmt: skip
        # The kernel's fused one-token step (every block and ln_f in one call) computes GPT-2's block: LayerNorms
        # and softmax attention only; other variants keep causal_attention (and the model's norms), op by op.
        norms = [m for b in self.t.h for m in (b.ln_1, b.ln_2)] + [self.t.ln_f]
        gpt2_block = self.cfg.attn_type == "SM" and all(type(m) is torch.nn.LayerNorm for m in norms)
        self.fused = (
            self._fused_params(quantize) if fused and self.kernel is not None and gpt2_block else None
        )
        compile = compile and w.device.type == "cuda"
        self.static = compile if static is None else (static or compile)
        self.step = self._step_static if self.static else self._step
        self.compiled = compile
        if compile:
            self.step = torch.compile(self._step_static, mode="reduce-overhead", fullgraph=True)

    def weight_bytes(self) -> int:
        """Bytes one decoded token reads at batch 1 in the format decoded (int8 matrices count 1 byte a weight
        plus their scales): the matrices, and every other parameter (LayerNorms, position embeddings) once; the
        token embedding's one row is not counted when it is tied to the head. The batch-1 floor's numerator."""
        mats = [self.head, *(m for lin in self.lin for m in lin.values())]
        skip = {id(self.model.lm_head.weight), id(self.t.wte.weight)}
        for block in self.t.h:
            for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                skip |= {id(p) for p in layer.parameters()}
        rest = sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in skip)
        return sum(m.nbytes() for m in mats) + rest

    def _linear(self, x: torch.Tensor, m: _Matrix) -> torch.Tensor:
        """``F.linear(x, W, b)`` for (..., in) -> (..., out) through the kernel, ``F.linear`` or ``x @ W^T``."""
        x2 = x.reshape(-1, x.size(-1))  # (M, in)
        rows = x2.size(0)
        one_row_mm = rows == 1 and m.wt is not None and self.kernel is not None and m is self.head
        if self.kernel is not None and (m.scale is not None or (rows <= gemv.MAX_ROWS and not one_row_mm)):
            y = self.kernel.gemv(x2.contiguous(), m.w, m.scale, m.b)
        elif m.wt is not None:  # the torch path: (in, out) copy
            y = torch.addmm(m.b, x2, m.wt) if m.b is not None else torch.mm(x2, m.wt)
        else:
            y = F.linear(x2, m.w, m.b)
        return y.view(*x.shape[:-1], y.size(-1))

    def _mlp(self, x: torch.Tensor, lin: dict) -> torch.Tensor:
        """GPT-2's MLP (GPT2AccelMLP.forward)."""
        return self._linear(F.gelu(self._linear(x, lin["mlp_in"]), approximate="tanh"), lin["mlp_out"])

    # -------------------------------------------------------------------------------------------- the network
    def _blocks(self, x: torch.Tensor, start: int, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Run positions [start, end) (x: (B, T, C)) through the blocks, writing their keys/values to the cache."""
        B, T, C = x.shape
        nh = self.cfg.n_head
        hs = C // nh
        impl = "eager" if self.cfg._attn_implementation == "eager" else "sdpa"
        for i, block in enumerate(self.t.h):
            lin = self.lin[i]
            q, k, v = self._linear(block.ln_1(x), lin["attn_qkv"]).split(C, dim=2)  # 3 x (B, T, C)
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
            x = x + self._linear(y.transpose(1, 2).reshape(B, T, C), lin["attn_out"])
            x = x + self._mlp(block.ln_2(x), lin)
        return self.t.ln_f(x)  # (B, T, C)

    def _fused_params(self, quantize: str | None) -> list[torch.Tensor]:
        """The parameters of every block, then ln_f, in the order of the kernel's ``decode_step``: per layer
        ln_1 (weight, bias), c_attn, attn c_proj (weight, scale, bias each), ln_2, c_fc, mlp c_proj; an empty
        tensor where there is no bias, scale or norm weight."""
        none = torch.empty(0)

        def norm(ln: torch.nn.Module) -> list[torch.Tensor]:
            return [none if p is None else p.detach().contiguous() for p in (ln.weight, ln.bias)]

        def mat(m: _Matrix) -> list[torch.Tensor]:
            return [m.w, none if m.scale is None else m.scale, none if m.b is None else m.b.contiguous()]

        params = []
        for block, lin in zip(self.t.h, self.lin, strict=True):
            params += norm(block.ln_1) + mat(lin["attn_qkv"]) + mat(lin["attn_out"])
            params += norm(block.ln_2) + mat(lin["mlp_in"]) + mat(lin["mlp_out"])
        return params + norm(self.t.ln_f)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._linear(h, self.head)  # (B, C) -> (B, V)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.size(1)
        pos = torch.arange(T, device=ids.device)
        x = self.t.wte(ids) + self.t.wpe(pos)  # (B, T, C)
        return self._logits(self._blocks(x, 0, T, None)[:, -1])  # (B, V)

    def _step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """One new token per row (tok: (B, 1)) at position ``pos``; keys up to ``pos`` (sliced cache)."""
        x = self.t.wte(tok) + self.t.wpe.weight[pos]  # (B, 1, C)
        if self.fused is not None and tok.size(0) <= gemv.MAX_ROWS:
            h = self.kernel.decode_step(
                x[:, 0],
                self.fused,
                self.k,
                self.v,
                pos,
                self.cfg.n_head,
                self.t.ln_f.eps,
                gemv.FUSED_SPLIT_BYTES,
            )  # (B, C): every block and ln_f in one call
            return self._logits(h)
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
            q, k, v = self._linear(block.ln_1(x), lin["attn_qkv"]).split(C, dim=2)
            q = q.view(B, 1, nh, hs).transpose(1, 2)
            self.k[i].index_copy_(2, pos[None], k.view(B, 1, nh, hs).transpose(1, 2))
            self.v[i].index_copy_(2, pos[None], v.view(B, 1, nh, hs).transpose(1, 2))
            y = causal_attention(
                q, self.k[i], self.v[i], self.cfg.attn_type, self.cfg.n_positions, attention_mask=mask
            )
            x = x + self._linear(y.transpose(1, 2).reshape(B, 1, C), lin["attn_out"])
            x = x + self._mlp(block.ln_2(x), lin)
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
        if self.static and getattr(self, "k", None) and self.k[0].shape == shape:
            return  # the fixed-shape step masks every slot past the current position: stale keys are never seen
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.t.h]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.t.h]
        if self.compiled:
            # CUDA graphs replay fixed addresses: a cache the step writes in place must be a static input, or
            # torch.compile skips CUDA graphs ("mutated inputs"); transformers' StaticCache marks its own the same way.
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)

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
        # The fixed-shape step takes its position as a device tensor, advanced in place: a fresh
        # torch.tensor(pos, device="cuda") per token is a copy from pageable memory, which waits for the GPU to
        # drain (CUDA's documented behaviour for such copies), so the CPU could never run ahead of the GPU.
        pos_t = torch.tensor(T, device=input_ids.device) if self.static else None
        for i in range(max_new_tokens):
            tok = _choose(logits, temperature, top_k, top_p)  # (B,)
            out[:, T + i] = tok
            if streamer is not None:
                streamer.put(tok.cpu())
            if i == max_new_tokens - 1:
                break
            if pos_t is None:
                logits = self.step(tok[:, None], T + i)
            else:
                logits = self.step(tok[:, None], pos_t)
                pos_t += 1
        if streamer is not None:
            streamer.end()
        return out


# ------------------------------------------------------------------------------------ generate()'s loop
# model -> (its weights' key, its Decoder or None when the decoder does not compute this model)
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# The model inputs generate() prepares for an unpadded prompt without a cache of the caller's (transformers 5.4-5.24);
# any other keyword (output_attentions, a multimodal input...) goes to transformers' loop.
_PLAIN_MODEL_KWARGS = {"attention_mask", "position_ids", "cache_position", "cache", "past_key_values", "use_cache", "logits_to_keep"}  # fmt: skip


def _weights_key(model) -> tuple | None:
    """Where every parameter lives and how often it was written in place: a decoder built for one key reads
    the same weights (an optimizer step, ``load_state_dict`` or ``.to()`` changes it). None where torch keeps
    no version counter (parameters made under ``torch.inference_mode``): no decoder is kept for them."""
    try:
        return tuple((p.data_ptr(), p._version) for p in model.parameters())
    except RuntimeError:
        return None


def _cached_decoder(model) -> Decoder | None:
    """This model's decoder, built (and checked against the model's forward) once per state of its weights."""
    key = _weights_key(model)
    hit = _DECODERS.get(model)
    if hit is not None and key is not None and hit[0] == key:
        return hit[1]
    decoder = Decoder(model) if supports_fast_decoding(model) else None
    if decoder is not None:
        # The cache is keyed weakly by the model: its value must not keep the model alive.
        decoder.model = weakref.proxy(model)
    if key is not None:
        _DECODERS[model] = (key, decoder)
    return decoder


def _given(v) -> bool:
    return v is not None and v is not False


def _not_plain(model, input_ids, generation_config, synced_gpus, model_kwargs) -> str | None:
    """Why this generate() call needs transformers' own loop (None: the decoder computes it exactly)."""
    gc = generation_config
    w = model.lm_head.weight
    T = input_ids.shape[1]
    if model.training:
        return "the model is in training mode (dropout)"
    if w.dtype != torch.float32 or input_ids.device != w.device:
        return f"{w.dtype} weights or inputs on another device than the weights (the decoder runs float32)"
    if synced_gpus or getattr(gc, "is_assistant", False):
        return "synced_gpus or assisted decoding"
    if gc.return_dict_in_generate or gc.output_scores or getattr(gc, "output_logits", False):
        return "return_dict_in_generate, output_scores or output_logits"
    if getattr(gc, "cache_implementation", None) is not None or getattr(gc, "prefill_chunk_size", None):
        return f"cache_implementation={gc.cache_implementation!r} or prefill_chunk_size"
    if not gc.use_cache or model_kwargs.get("use_cache") is False:
        return "use_cache=False"
    extra = sorted(k for k, v in model_kwargs.items() if k not in _PLAIN_MODEL_KWARGS and _given(v))
    if extra:
        return f"model inputs {extra}"
    if T == 0 or gc.max_length is None or not T < gc.max_length <= model.config.n_positions:
        return f"prompt length {T} and max_length {gc.max_length} (n_positions {model.config.n_positions})"
    mask = model_kwargs.get("attention_mask")
    if mask is not None and (mask.shape != input_ids.shape or not bool((mask == 1).all())):
        return "a padded batch (attention_mask)"
    pos = model_kwargs.get("position_ids")
    if pos is not None and not torch.equal(pos, torch.arange(T, device=pos.device).expand_as(pos)):
        return "position_ids other than 0..T-1"
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)
        if cache is not None and (cache.get_seq_length() > 0 or getattr(cache, "_is_user_defined", False)):
            return "a cache passed in (it is filled and returned by transformers' loop)"
    return None


def fast_sample(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.Tensor | None:
    """transformers' greedy/sampling loop (``GenerationMixin._sample``, which ``generate()`` runs for
    ``num_beams=1``) over :class:`Decoder`'s static-cache steps; None where it does not apply (see
    :func:`_not_plain`), and ``GPT2AccelForCausalLM._sample`` then runs transformers' loop.

    ``generate()`` has already resolved the generation config, built the logits processors (temperature, top-k,
    top-p, repetition penalty, min_new_tokens...) and stopping criteria (max_length, eos, stop strings, max_time),
    and streamed the prompt. Each step below is ``_sample``'s: the processors on float32 logits, argmax or one
    ``torch.multinomial`` draw (the same draws from torch's RNG), finished rows padded with ``pad_token_id``, the
    criteria, and stop when every row is done. Only the forward differs: the decoder's step, whose logits equal
    the model's within fp32 rounding (tests/test_generate_fast.py compares tokens with transformers' loop).
    """
    gc = generation_config
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)  # as _sample decides to pad
    pad = getattr(gc, "_pad_token_tensor", None)
    why = _not_plain(model, input_ids, gc, synced_gpus, model_kwargs)
    if why is None and has_eos and pad is None:
        why = "an eos stopping criterion without a pad token"
    decoder = None if why else _cached_decoder(model)
    if decoder is None:
        logger.debug("generate(): transformers' loop (%s)", why or "the decoder does not compute this model")
        return None
    B, T = input_ids.shape
    total = gc.max_length
    decoder._alloc(B, total)
    # (B, prompt + new); its first `cur` columns are the processors' and criteria's input_ids
    out = input_ids.new_empty(B, total)
    out[:, :T] = input_ids
    if has_eos:
        pad = pad.to(input_ids.device)
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    logits = decoder._prefill(input_ids)  # (B, V)
    cur = T
    while True:
        scores = logits_processor(out[:, :cur], logits.to(copy=True, dtype=torch.float32))
        if gc.do_sample:
            tok = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tok = torch.argmax(scores, dim=-1)
        if has_eos:
            tok = tok * unfinished + pad * (1 - unfinished)  # finished rows continue with padding
        out[:, cur] = tok
        cur += 1
        if streamer is not None:
            streamer.put(tok.cpu())
        unfinished = unfinished & ~stopping_criteria(out[:, :cur], None)
        if cur == total or unfinished.max() == 0:
            break
        logits = decoder.step(tok[:, None], cur - 1)
    if streamer is not None:
        streamer.end()
    return out[:, :cur].contiguous() if cur < total else out


class _Matrix:
    """One weight matrix as the decoder reads it: ``w`` (out, in) fp32 (the parameter itself, no copy) or int8
    with ``scale`` (out,); ``wt`` the (in, out) copy for torch's path; ``b`` the bias or None."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, quantize: str | None, transpose: bool):
        w = w.detach()
        self.b = b.detach() if b is not None else None
        self.scale = None
        self.wt = None
        if quantize == "int8":
            self.w, self.scale = gemv.quantize_int8(w)
        else:
            self.w = w.contiguous()
            if transpose:
                self.wt = w.t().contiguous()

    @classmethod
    def of(cls, layer: torch.nn.Linear, quantize: str | None, transpose: bool) -> _Matrix:
        return cls(layer.weight, layer.bias, quantize, transpose)

    def nbytes(self) -> int:
        """Bytes read per product (the weights in the format used, its scales and bias)."""
        t = [self.wt if self.wt is not None else self.w, self.scale, self.b]
        return sum(x.numel() * x.element_size() for x in t if x is not None)


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
