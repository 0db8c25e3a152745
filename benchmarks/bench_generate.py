"""Generation speed on CPU/GPU: what `gpt2-accel sample` runs against transformers' generate() and simpler loops,
at batch 1 against the memory-bandwidth floor, and with several prompts decoded together (issues 9 and 19).

    python benchmarks/bench_generate.py        # issue 19's figures, ~6 min on 2 idle cores: ref shape, batch 1, 8, 32
    python benchmarks/bench_generate.py --shape ref,124m --prompt 1,256 --methods recompute,cache-loop,generate,fast
    python benchmarks/bench_generate.py --quick                  # tiny smoke run
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16   # the GPU levers (methods below)

Shapes (256 new greedy tokens): ``ref`` = the reference model (6 layers, 6 heads, 384 wide, vocab 50257 padded to
50304, fp32) with 512 positions so that a 256-token prompt + 256 new tokens fit; ``124m`` = GPT-2 124M (12 layers,
12 heads, 768 wide, 1024 positions). Methods, interleaved in a rotating order every round:

* ``recompute``: nanoGPT's sampler: crop the sequence to the context, run it all through the model, keep the last
  position's logits (only that position goes through the LM head, as nanoGPT does), append the argmax.
* ``cache-loop``: a minimal cached loop: the prompt once into a ``DynamicCache``, then one token per forward.
* ``generate``: ``generate()`` on our model (greedy, cache), as a user calls it: transformers prepares the call
  (generation config, logits processors, stopping criteria) and, for plain greedy/sampled decoding of float32
  weights, the loop runs on ``gpt2_accel.decode``'s decoder (``GPT2AccelForCausalLM.fast_sample``) with
  transformers' processors and criteria each token.
* ``generate-hf``: ``generate()`` with that hook off (``model.fast_sample = None``): transformers' own loop, the
  ``cache-loop`` above plus its per-token machinery (input preparation, a growing ``DynamicCache``).
* ``fast``: ``gpt2_accel.decode.Decoder``, what ``gpt2-accel sample`` runs (``--batch_size`` rows at once): a
  static KV cache and, on CPU, the matrices through gpt2_accel.gemv's kernel (issue 19).
* ``fast-torch``: the same decoder with torch's products (transposed weight copies, ``x @ W^T``): what sample
  runs where the kernel cannot be built, and the kernel's baseline.
* ``fast-static`` / ``fast-compile``: the decoder's fixed-shape step (a full-length KV buffer, later slots masked)
  eager, and compiled with CUDA graphs (``gpt2-accel sample --compile``; ``torch.compile(mode="reduce-overhead")``):
  the GPU levers of issue 19 (static cache, compiled decode step, CUDA graphs). Compilation happens in the warm-up.
* ``generate-static``: ``generate(cache_implementation="static")``, transformers' own static cache on our model.
* ``fast-int8``: the decoder with weight-only int8 matrices (``gpt2-accel sample --quantize int8``). Its tokens
  are the quantised model's: they are compared with the others and reported, not required to be equal. Its
  batch-1 line gives both the fp32 floor and its own floor (its bytes: int8 matrices, fp32 scales and the rest).

The batch-1 floor is printed first: bytes of weights (each decoded token reads all of them once) over the memory
read bandwidth measured in the same run (best of 7 sums over a 512 MB buffer, 2 GB on a GPU); each batch-1 method's tokens/s is
also given as a percentage of it. ``--batch 1,8,32`` decodes that many prompts together (tokens/s counts every
row; above batch 1 the weights are read once per step for all rows, so the floor no longer bounds it).

Every fp32 method must produce the same tokens; the script checks it (exit status 1 otherwise). Reported: median wall
time and process CPU time (all threads; steadier on a shared host) per method, and the median of per-round ratios
against the first method given (``recompute`` when it runs). The load average is printed with every round: figures
taken at a load above the thread count are those of a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicCache

from gpt2_accel.configuration_gpt2_accel import GPT2AccelConfig
from gpt2_accel.modeling_gpt2_accel import GPT2AccelForCausalLM

SHAPES = {  # n_layer, n_head, n_embd, n_positions
    "ref": (6, 6, 384, 512),
    "124m": (12, 12, 768, 1024),
    "tiny": (2, 2, 64, 128),
}


@torch.no_grad()
def generate_hf(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """transformers' generate() on our model: the prompt once, then one token per forward with the KV cache."""
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        # no row stops at <|endoftext|>, as `gpt2-accel sample` passes it. (min_new_tokens=new_tokens would force
        # the length too, but its logits processor, transformers' own, costs ~0.7-2 ms a token here: torch.isin
        # over the 50257-entry vocabulary every step.)
        eos_token_id=None,
        **kwargs,
    )


def generate_hf_loop(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """generate() with transformers' own decoding loop (our faster loop unplugged for this call)."""
    model.fast_sample = None
    try:
        return generate_hf(model, prompt, new_tokens)
    finally:
        del model.fast_sample  # back to the class's hook


def generate_hf_static(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """generate() with transformers' StaticCache (a fixed-size buffer written in place)."""
    return generate_hf(model, prompt, new_tokens, cache_implementation="static")


@torch.no_grad()
def generate_cache_loop(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The least Python per token: one forward of the new token against the cache, argmax, repeat."""
    cache = DynamicCache(config=model.config)
    out = [prompt]  # (B, T) then (B, 1) per new token
    ids = prompt
    for _ in range(new_tokens):
        logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        ids = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(ids)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_recompute(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Re-run the whole sequence (cropped to the context) for every new token; no cache."""
    ids = prompt  # (B, T)
    ctx = model.config.n_positions
    for _ in range(new_tokens):
        logits = model(ids[:, -ctx:], use_cache=False, logits_to_keep=1).logits  # (B, 1, V)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T + 1)
    return ids


def decoder(model: GPT2AccelForCausalLM, **kwargs):
    """The gpt2_accel.decode.Decoder of ``model`` with these options, built once (as sample builds it once)."""
    from gpt2_accel.decode import Decoder

    cache = model.__dict__.setdefault("_bench_decoders", {})
    key = tuple(sorted(kwargs.items()))
    if key not in cache:
        cache[key] = Decoder(model, **kwargs)
    return cache[key]


def fast_method(**kwargs) -> Callable:
    def run(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return decoder(model, **kwargs).generate(prompt, new_tokens)

    return run


METHODS: dict[str, Callable] = {
    "recompute": generate_recompute,
    "cache-loop": generate_cache_loop,
    "generate": generate_hf,
    "generate-hf": generate_hf_loop,
    "generate-static": generate_hf_static,
    "fast": fast_method(),  # what `gpt2-accel sample` runs
    "fast-torch": fast_method(kernel=False),
    "fast-int8": fast_method(quantize="int8"),
    "fast-static": fast_method(static=True),
    "fast-compile": fast_method(compile=True),
}
EXACT = {"fast-int8": False}  # methods whose tokens need not equal the others' (a quantised model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(mb: int = 512, rounds: int = 7, device: str = "cpu") -> float:
    """Memory read bandwidth in bytes/s: best of ``rounds`` sums over an ``mb`` MB fp32 buffer (far beyond the
    caches), with the torch threads in use (on a GPU, its memory). The batch-1 decoding floor is weight bytes / this."""
    buf = torch.ones(mb * 2**20 // 4, device=device)
    buf.sum()
    best = float("inf")
    for _ in range(rounds):
        _sync(buf.device)
        t0 = time.perf_counter()
        buf.sum()
        _sync(buf.device)
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def weight_bytes(model: GPT2AccelForCausalLM) -> int:
    """Bytes one decoded token must read: every parameter once (the tied head counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build(shape: str, vocab: int, device: str = "cpu", dtype: str = "float32") -> GPT2AccelForCausalLM:
    n_layer, n_head, n_embd, n_positions = SHAPES[shape]
    config = GPT2AccelConfig(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GPT2AccelForCausalLM(config).eval().to(device=device, dtype=getattr(torch, dtype))


def run_case(
    model: GPT2AccelForCausalLM, prompt_len: int, new: int, rounds: int, methods: list[str], batch: int = 1
) -> dict:
    """Interleaved rounds of every method; returns {method: (median wall, median cpu, median speed-up)}.

    fp32 methods must produce the same tokens; in bf16 the methods round differently (another product shape,
    another kernel), so each method's agreement with the first is reported instead."""
    vocab = model.config.vocab_size
    dev = model.device
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    # warm-up (allocator, BLAS threads; on a GPU the compiled step and its CUDA graph, at this batch size)
    outs = {m: METHODS[m](model, prompt, 4) for m in methods}
    res: dict = {}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            outs[m] = METHODS[m](model, prompt, new)
            _sync(dev)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
        print(
            f"  round {r + 1}/{rounds} (load {os.getloadavg()[0]:.2f}): "
            + "  ".join(f"{m} {wall[m][-1]:.2f} s (cpu {cpu[m][-1]:.2f})" for m in methods)
        )
    fp32 = model.dtype == torch.float32
    exact = [m for m in methods if EXACT.get(m, True)]
    ref = outs[exact[0]] if exact else None
    same = all(torch.equal(outs[m], ref) for m in exact) if fp32 else True
    for m in methods:
        if (not EXACT.get(m, True) or not fp32) and ref is not None and m != exact[0]:
            new = outs[m][:, prompt_len:] == ref[:, prompt_len:]  # (B, new)
            first = (~new).int().argmax(1).where(~new.all(1), torch.tensor(new.size(1)))
            res[f"agree:{m}"] = (new.float().mean().item(), first.min().item(), new.size(1))
    base = methods[0]  # speed-ups are against the first method
    for m in methods:
        sw = statistics.median(a / b for a, b in zip(wall[base], wall[m], strict=True))
        sc = statistics.median(a / b for a, b in zip(cpu[base], cpu[m], strict=True))
        res[m] = (statistics.median(wall[m]), statistics.median(cpu[m]), sw, sc)
    res["identical"] = same
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="ref", help="comma-separated: ref, 124m, tiny")
    p.add_argument("--prompt", default="1", help="comma-separated prompt lengths in tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens to generate")
    p.add_argument("--vocab", type=int, default=50257, help="vocab_size (padded to a multiple of 64)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case (default 2)")
    p.add_argument(
        "--threads",
        default=str(torch.get_num_threads()),
        help="comma-separated torch thread counts to run (default: torch's, all cores)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of "
        + ",".join(METHODS)
        + " (default on CPU generate,generate-hf,fast,fast-torch,fast-int8; on a GPU generate,generate-hf,generate-static,fast,"
        "fast-static,fast-compile)",
    )
    p.add_argument(
        "--batch",
        default="1,8,32",
        help="comma-separated batch sizes (prompts decoded together; default 1,8,32)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (methods default to the ones that run there)")
    p.add_argument("--dtype", default="float32", help="the model's dtype: float32 or bfloat16 (GPU)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.prompt, a.vocab, a.new, a.rounds, a.threads, a.batch = (
            "tiny",
            "1,16",
            500,
            32,
            2,
            "1",
            "1,4",
        )
    gpu = a.device != "cpu"
    default = (
        "generate,generate-hf,generate-static,fast,fast-static,fast-compile"
        if gpu
        else "generate,generate-hf,fast,fast-torch,fast-int8"
    )
    methods = (a.methods or default).split(",")
    ok = True
    t_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {a.new} new greedy tokens"
        + (f"; {torch.cuda.get_device_name(a.device)}" if gpu else "")
    )
    for shape in a.shape.split(","):
        model = build(shape, a.vocab, a.device, a.dtype)
        for threads in (int(t) for t in a.threads.split(",")):
            torch.set_num_threads(threads)
            bw = read_bandwidth(2048 if gpu else 512, device=a.device)
            floor = weight_bytes(model) / bw  # s per token at batch 1
            print(
                f"{shape}: weights {weight_bytes(model) / 1e6:.1f} MB, read bandwidth {bw / 1e9:.1f} GB/s "
                f"({threads} thread(s)) -> batch-1 floor {floor * 1e3:.2f} ms/token = {1 / floor:.1f} tokens/s"
            )
            for batch in (int(b) for b in a.batch.split(",")):
                for prompt_len in (int(x) for x in a.prompt.split(",")):
                    print(
                        f"{shape} {SHAPES[shape]} vocab {a.vocab}, {a.device} {a.dtype}, {threads} thread(s), batch {batch}, "
                        f"prompt {prompt_len}:"
                    )
                    res = run_case(model, prompt_len, a.new, a.rounds, methods, batch)
                    ok &= res.pop("identical")
                    agree = {k.split(":", 1)[1]: res.pop(k) for k in list(res) if k.startswith("agree:")}
                    # the tokens each other method is compared with: the first exact (non-quantised) method's
                    ref_name = next(m for m in methods if EXACT.get(m, True)) if agree else ""
                    for m, (w, c, sw, sc) in res.items():
                        tps = batch * a.new / w
                        of_floor = f"  {100 * (a.new / w) * floor:5.1f}% of floor" if batch == 1 else ""
                        if batch == 1 and m == "fast-int8":
                            own = decoder(model, quantize="int8").weight_bytes() / bw  # s per token
                            of_floor += (
                                f", {100 * (a.new / w) * own:5.1f}% of its own ({1 / own:.1f} tokens/s)"
                            )
                        print(
                            f"  {m:<15}{tps:8.1f} tokens/s  wall {w:6.2f} s  cpu {c:6.2f} s  "
                            f"vs {methods[0]}: wall {sw:5.2f}x  cpu {sc:5.2f}x{of_floor}"
                        )
                    for m, (frac, first, n) in agree.items():
                        print(
                            f"  {m}: {100 * frac:.1f}% of its greedy tokens equal {ref_name}'s; first "
                            f"difference at new token {first} of {n}" + (" (none)" if first == n else "")
                        )
    print(
        f"greedy tokens identical across methods: {ok} "
        + (
            "(fp32 methods; fast-int8 reported above); "
            if a.dtype == "float32"
            else f"(not required in {a.dtype}: each method's agreement is reported above); "
        )
        + f"{time.perf_counter() - t_start:.0f} s, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
