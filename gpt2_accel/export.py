"""Export a model for other runtimes (``gpt2-accel export``): transformers, llama.cpp (GGUF), ONNX Runtime.

Every format starts from the same place: the model exported as a transformers directory of the standard class
that computes it exactly (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``Qwen3ForCausalLM``...; see
:func:`gpt2_accel.convert.export_class`), read back together with its architecture (``config.json``'s
``model_type``). GGUF is written from that directory with the ``gguf`` package (the library llama.cpp's own
converter uses); each architecture the writer knows is one entry of :data:`GGUF_ARCHS` (``gpt2``, ``llama``,
``qwen3``), and :func:`gguf_blockers` names what llama.cpp cannot compute in a config before anything is written.
A magnitude-preserving (EDM2) model is first folded into the plain model with the same logits
(:mod:`gpt2_accel.fold`), and exported as that.

ONNX is exported from our module with torch's dynamo exporter as two graphs, the layout Optimum and
onnxruntime-genai use for decoders: ``decoder_model.onnx`` (the prompt: ``input_ids`` -> ``logits`` and the
``present.*`` keys/values) and ``decoder_with_past_model.onnx`` (one or more new tokens against ``past_key_values.*``).
Batch and sequence (and past) lengths are dynamic.

Bad input fails before anything is written: an unknown format or quantisation, a model the format cannot express
(the error names the option that prevents it), an existing output without ``--overwrite``. Each export is
written to a temporary name next to the target and renamed at the end, so a failure leaves nothing at the target.

Command line::

    gpt2-accel export runs/my-run --format hf   --output exported/my-run
    gpt2-accel export runs/my-run --format gguf --output my-run-q8_0.gguf --outtype q8_0
    gpt2-accel export runs/my-run --format onnx --output onnx/my-run
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._compat import moved_main
from .atomic import atomic_output

# Format -> the weight types it can be written in (first = default).
OUTTYPES: dict[str, tuple[str, ...]] = {
    "hf": ("f32", "f16", "bf16"),
    "gguf": ("f32", "f16", "q8_0"),
    "onnx": ("f32",),
}
_TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """The export cannot be done as asked; the message names the cause and the fix. Nothing was written."""


# ------------------------------------------------------------------------------------------------ checks


def check_request(fmt: str, outtype: str | None, output: str | os.PathLike, overwrite: bool) -> str:
    """Validate format, quantisation and target before any work; returns the resolved outtype."""
    if fmt not in OUTTYPES:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(OUTTYPES)}")
    outtype = outtype or OUTTYPES[fmt][0]
    if outtype not in OUTTYPES[fmt]:
        raise ExportError(
            f"--outtype {outtype!r} is not supported for --format {fmt}; supported: {', '.join(OUTTYPES[fmt])}"
        )
    out = Path(output)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it, or choose another --output")
    return outtype


def check_expressible(config, fmt: str) -> None:
    """Raise :class:`ExportError` if ``fmt`` cannot express the model ``config`` describes, naming why."""
    from .convert import export_class

    attn_type = getattr(config, "attn_type", "SM")
    if attn_type != "SM":
        runtime = {
            "hf": "no standard transformers class",
            "gguf": "llama.cpp",
            "onnx": "the ONNX decoder export",
        }[fmt]
        raise ExportError(
            f"attn_type={attn_type!r} cannot be exported to {fmt}: {runtime} computes softmax attention only "
            "('SM'). Share the model as a run directory instead (its code travels with it: "
            "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)), or distil it into a softmax model"
        )
    try:
        model_type = export_class(config)  # the standard class that computes the model exactly
    except ValueError as e:
        raise ExportError(str(e)) from None
    if fmt == "gguf" and model_type != "gpt2":
        from .convert import _rotary_config

        blockers = gguf_blockers(_rotary_config(config, model_type).to_dict())
        if blockers:
            raise ExportError(
                f"this model exports as transformers' {model_type} class, which llama.cpp cannot compute exactly "
                f"here: {'; '.join(blockers)}. Export it with --format hf instead, or retrain without those options"
            )
    if fmt == "onnx" and model_type != "gpt2":
        # The ONNX decoder is written and verified for the GPT-2 graph only (docs/export.md).
        raise ExportError(
            f"--format onnx is written and verified for GPT-2-class models only; this model's architecture "
            f"options make it a {model_type} model. Export it with --format hf (a standard {model_type} "
            "directory), which optimum's ONNX export takes"
        )


# ------------------------------------------------------------------------------------------------ atomic output


def _atomic_target(output: Path, overwrite: bool, write: Callable[[Path], None], *, is_dir: bool) -> Path:
    """Run ``write(tmp)`` on a temporary path next to ``output``, then move it into place.

    On any failure the temporary path is removed and ``output`` is untouched (an existing one too).
    """
    output = output.resolve()
    try:
        with atomic_output(output, is_dir=is_dir, overwrite=overwrite) as target:
            write(target)
    except FileExistsError as e:  # appeared while we worked
        raise ExportError(f"{e}; pass --overwrite to replace it") from None
    return output


# ------------------------------------------------------------------------------------------------ transformers


def write_hf(model, directory: Path, tokenizer=None, *, outtype: str = "f32") -> None:
    """Write ``model`` (ours) as the standard transformers class that computes it exactly (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or ``NanoChatForCausalLM``; see convert.export_class), with its tokenizer.

    ``config.json`` carries ``n_ctx`` (llama.cpp's own converter reads it) and ``tokenizer_config.json``
    carries ``model_max_length = n_positions``.
    """
    from .convert import to_hf

    hf = to_hf(model).to(_TORCH_DTYPES[outtype])
    hf.save_pretrained(directory)
    if tokenizer is not None:
        from .tokenization import save_tokenizer

        save_tokenizer(tokenizer, directory, model.config.n_positions)


# ------------------------------------------------------------------------------------------------ GGUF


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture becomes llama.cpp's: its GGUF name, metadata and tensor layout."""

    arch: str  # a gguf.MODEL_ARCH member name
    write_metadata: Callable  # (writer, hf_config: dict) -> None
    to_gguf_layout: (
        Callable  # (hf_name, tensor, hf_config) -> tensor in GGUF's (out, in) layout, or None to skip
    )


def _gpt2_metadata(writer, cfg: dict) -> None:
    n_embd = cfg["n_embd"]
    writer.add_context_length(cfg["n_positions"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(cfg.get("n_inner") or 4 * n_embd)
    writer.add_block_count(cfg["n_layer"])
    writer.add_head_count(cfg["n_head"])
    writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])


# transformers' GPT-2 keeps OpenAI's Conv1D (in, out) weights; GGUF wants (out, in) like nn.Linear.
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_layout(name: str, tensor: torch.Tensor, cfg: dict) -> torch.Tensor | None:
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # causal-mask buffers of old transformers versions
    if name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
        return None  # tied: llama.cpp's GPT-2 graph reuses token_embd when `output` is absent
    if name.endswith(_GPT2_CONV1D):
        return tensor.t()
    return tensor


def _rope(cfg: dict) -> dict:
    """The rotary settings of a transformers Llama/Qwen3 config (transformers 5's ``rope_parameters``, or the
    older ``rope_theta`` + ``rope_scaling``)."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def _yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature for ``factor`` (Peng et al. 2023, eq. 22; transformers' get_mscale)."""
    import math

    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def gguf_blockers(cfg: dict) -> list[str]:
    """What llama.cpp cannot compute in the transformers config ``cfg`` (empty: the GGUF computes it exactly).

    Read from the llama.cpp that llama-cpp-python 0.3.36 vendors (src/models/llama.cpp, qwen3.cpp,
    llama-context.cpp, llama-hparams.h): its Llama and Qwen3 graphs have no sliding-window attention, Qwen3's has no attention
    output bias, and its YaRN uses beta_fast=32 / beta_slow=1 for these architectures (the GGUF keys are not
    read) and truncates the correction range as transformers' ``truncate=True`` does.
    """
    model_type = cfg.get("model_type")
    if model_type not in GGUF_ARCHS:
        return [f"model_type={model_type!r} (llama.cpp architectures written: {', '.join(GGUF_ARCHS)})"]
    if model_type == "gpt2":
        return []
    b = []
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        b.append("sliding_window (llama.cpp's llama/qwen3 graphs attend to every earlier position)")
    if model_type == "qwen3" and cfg.get("attention_bias"):
        b.append("attention_bias=True (llama.cpp's qwen3 graph has no attention output bias)")
    rope = _rope(cfg)
    if rope["rope_type"] not in ("default", "yarn"):
        b.append(f"rope_type={rope['rope_type']!r} (written: default, yarn)")
    if rope["rope_type"] == "yarn":
        for key, fixed in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True)):
            if rope.get(key, fixed) != fixed:
                b.append(f"YaRN {key}={rope[key]!r} (llama.cpp's {model_type} graph uses {fixed})")
    return b


def _rotary_metadata(writer, cfg: dict) -> None:
    """Llama / Qwen3 hyper-parameters under llama.cpp's keys (what convert_hf_to_gguf.py writes for them)."""
    import gguf

    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])  # GQA / MQA
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)  # the whole head rotates
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = _rope(cfg)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "yarn":
        factor = float(rope["factor"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        if rope.get("attention_factor") is not None:
            # llama.cpp applies YaRN's own temperature (0.1 ln(factor) + 1) and multiplies by
            # `rope.scaling.attn_factor` (llama-context.cpp); transformers uses attention_factor instead of it.
            writer.add_rope_scaling_attn_factors(float(rope["attention_factor"]) / _yarn_mscale(factor))


def _permute_rotary_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' Llama rotates each head's two halves (x_i, x_{i + hs/2}); llama.cpp's llama graph rotates
    adjacent pairs (x_2i, x_2i+1) (LLAMA_ROPE_TYPE_NORM). Reordering the rows of q and k per head,
    (nh, 2, hs/2, ...) -> (nh, hs/2, 2, ...), turns one into the other; dot products of q and k are unchanged.
    convert_hf_to_gguf.py does the same for LlamaModel (its `permute`)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotary_layout(name: str, tensor: torch.Tensor, cfg: dict) -> torch.Tensor | None:
    if name == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
        return None  # tied: llama.cpp reuses token_embd when `output` is absent
    if name.endswith(".rotary_emb.inv_freq"):
        return None  # a buffer recomputed from the metadata
    if cfg["model_type"] == "llama":  # Qwen3's graph rotates halves, as transformers does (NEOX rope)
        if ".self_attn.q_proj." in name:
            return _permute_rotary_halves(tensor, cfg["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
            return _permute_rotary_halves(tensor, n_kv)
    return tensor  # nn.Linear weights are already (out, in)


GGUF_ARCHS: dict[str, GGUFArch] = {
    "gpt2": GGUFArch("GPT2", _gpt2_metadata, _gpt2_layout),
    "llama": GGUFArch("LLAMA", _rotary_metadata, _rotary_layout),
    "qwen3": GGUFArch("QWEN3", _rotary_metadata, _rotary_layout),
}


def _gguf_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    """GPT-2 style byte-level BPE from ``tokenizer.json``: tokens by id, their types, merges, special ids."""
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{directory} has no tokenizer.json; a GGUF file carries its tokenizer. Save the run's tokenizer "
            "next to the model (tokenizer.save_pretrained) and export again"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE" or (tok.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"{path}: GGUF export writes GPT-2 byte-level BPE tokenizers; this one is "
            f"{model.get('type')} with pre-tokenizer {(tok.get('pre_tokenizer') or {}).get('type')}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    by_id = {i: s for s, i in vocab.items()}
    if len(by_id) != vocab_size or set(by_id) != set(range(vocab_size)):
        raise ExportError(
            f"{path} has {len(by_id)} tokens with ids not exactly 0..{vocab_size - 1}, but the model's "
            f"vocab_size is {vocab_size}; llama.cpp needs one token per embedding row"
        )
    tokens = [by_id[i] for i in range(vocab_size)]
    types = [
        gguf.TokenType.CONTROL if s in special else gguf.TokenType.NORMAL for s in tokens
    ]  # llama.cpp renders CONTROL tokens only on request, as transformers' skip_special_tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenisation regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT2)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        name = cfg.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if name in vocab:
            add(vocab[name])
    writer.add_add_bos_token(False)  # GPT-2 prompts start without a BOS token (transformers adds none)


def write_gguf(
    directory: str | os.PathLike, path: str | os.PathLike, outtype: str = "f32", *, name: str | None = None
) -> None:
    """Write the transformers model directory ``directory`` (a class in :data:`GGUF_ARCHS`) as a GGUF file.

    ``outtype``: ``f32``; ``f16`` (matrices in half precision, norms and biases f32, as llama.cpp's converter);
    ``q8_0`` (matrices in llama.cpp's 8-bit blocks of 32; a matrix whose rows are not a multiple of 32 falls
    back to f16, as llama.cpp's converter does). ``name``: ``general.name`` (default: the directory's name).
    """
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model_type = cfg.get("model_type")
    blockers = gguf_blockers(cfg)
    if blockers:
        raise ExportError(f"{directory} cannot be written as GGUF for llama.cpp: {'; '.join(blockers)}")
    if outtype not in OUTTYPES["gguf"]:
        raise ExportError(f"--outtype {outtype!r} is not a GGUF type we write; use {OUTTYPES['gguf']}")
    spec = GGUF_ARCHS[model_type]
    arch = gguf.MODEL_ARCH[spec.arch]
    names = gguf.get_tensor_name_map(arch, cfg["n_layer"] if "n_layer" in cfg else cfg["num_hidden_layers"])
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]

    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise ExportError(f"{directory} has no *.safetensors weights")

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or directory.name)
    spec.write_metadata(writer, cfg)
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _gguf_tokenizer(writer, directory, cfg["vocab_size"])

    for hf_name, tensor in state.items():
        tensor = spec.to_gguf_layout(hf_name, tensor, cfg)
        if tensor is None:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of {model_type} (gguf {gguf.__name__})")
        data = tensor.float().contiguous().numpy()
        if data.ndim == 2 and outtype != "f32":
            if (
                outtype == "q8_0"
                and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
            ):
                q = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
                continue
            data = data.astype(np.float16)
        writer.add_tensor(name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------------------------------ ONNX


class _OnnxDecoder(nn.Module):
    """Our GPT-2 with the KV cache as plain tensors, for tracing: (input_ids, past k/v per layer) -> logits, present.

    The blocks' own modules (``ln_1``, ``c_attn``, ``c_proj``, ``ln_2``, ``mlp``, ``ln_f``, ``lm_head``) do the
    work; only the cache bookkeeping that ``transformers.DynamicCache`` does in Python becomes a concatenation,
    and the causal mask is built from the lengths so that it stays symbolic. Softmax attention only.
    """

    def __init__(self, model, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        t = self.model.transformer
        cfg = self.model.config
        B, T = input_ids.shape  # (B, T)
        P = past[0].shape[2] if self.with_past else 0  # cached positions
        pos = torch.arange(T, device=input_ids.device) + P  # (T,)
        x = t.wte(input_ids) + t.wpe(pos)[None]  # (B, T, C)
        k_pos = torch.arange(T, device=input_ids.device) + P
        if self.with_past:
            k_pos = torch.arange(past[0].shape[2] + T, device=input_ids.device)  # (P + T,)
        mask = k_pos[None, :] <= pos[:, None]  # (T, P + T): key j visible to query i when j <= its position
        present = []
        nh, C = cfg.n_head, cfg.n_embd
        for i, block in enumerate(t.h):
            a = block.attn
            q, k, v = a.c_attn(block.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
            q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, nh, C // nh).transpose(1, 2)
            v = v.view(B, T, nh, C // nh).transpose(1, 2)
            if self.with_past:
                k = torch.cat([past[2 * i], k], dim=2)  # (B, nh, P + T, hs)
                v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
            x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        logits = self.model.lm_head(t.ln_f(x))[..., : cfg.vocab_size]  # (B, T, vocab_size)
        return (logits, *present)


def onnx_io_names(n_layer: int, with_past: bool) -> tuple[list[str], list[str]]:
    """Input and output names (Optimum's convention: ``past_key_values.{i}.key``, ``present.{i}.value``)."""
    kv = [f"{{}}.{i}.{w}" for i in range(n_layer) for w in ("key", "value")]
    inputs = ["input_ids"] + ([s.format("past_key_values") for s in kv] if with_past else [])
    return inputs, ["logits"] + [s.format("present") for s in kv]


def write_onnx(model, directory: Path, tokenizer=None) -> None:
    """Export ``model`` (ours, softmax attention) as ``decoder_model.onnx`` + ``decoder_with_past_model.onnx``."""
    from torch.export import Dim

    directory.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    cfg = model.config
    L, nh, hs = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    batch, seq, past_len = Dim("batch", min=1, max=4096), Dim("sequence", min=1), Dim("past_sequence", min=1)
    # Example sizes above 1 so the exporter does not specialise the dynamic dimensions to 0/1.
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    for with_past, name in ((False, "decoder_model.onnx"), (True, "decoder_with_past_model.onnx")):
        inputs, outputs = onnx_io_names(L, with_past)
        past = tuple(torch.zeros(2, nh, 4, hs) for _ in range(2 * L)) if with_past else ()
        # forward(input_ids, *past): torch.export sees the varargs as one tuple argument
        shapes = ({0: batch, 1: seq},) + (
            (tuple({0: batch, 2: past_len} for _ in past),) if with_past else ()
        )
        with torch.no_grad():
            program = torch.onnx.export(
                _OnnxDecoder(model, with_past).eval(),
                (ids, *past),
                dynamo=True,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
                report=False,
            )
        program.save(str(directory / name))
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        from .tokenization import save_tokenizer

        save_tokenizer(tokenizer, directory, cfg.n_positions)


# ------------------------------------------------------------------------------------------------ entry point


def export(
    source: str,
    fmt: str,
    output: str | os.PathLike,
    *,
    outtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export the gpt2_accel model at ``source`` (run directory, checkpoint, Hub id) to ``output``."""
    from .convert import _load_ours
    from .fold import plain_model
    from .sample import load_tokenizer, resolve_model_path

    outtype = check_request(fmt, outtype, output, overwrite)
    path = resolve_model_path(source)
    # A magnitude-preserving model exports as the plain model its constants fold into (gpt2_accel.fold).
    model = plain_model(_load_ours(path))
    check_expressible(model.config, fmt)
    tokenizer = load_tokenizer(path)
    if tokenizer is None and model.config.vocab_size == 50257:  # GPT-2's vocabulary: the bundled BPE
        from .tokenization import get_tokenizer

        tokenizer = get_tokenizer("gpt2").hf
    output = Path(output)

    if fmt == "hf":
        return _atomic_target(
            output, overwrite, lambda d: write_hf(model, d, tokenizer, outtype=outtype), is_dir=True
        )
    if fmt == "onnx":
        return _atomic_target(output, overwrite, lambda d: write_onnx(model, d, tokenizer), is_dir=True)

    def gguf_file(target: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".hf-", dir=target.parent) as hf_dir:
            write_hf(model, Path(hf_dir), tokenizer)
            write_gguf(hf_dir, target, outtype, name=output.stem)

    return _atomic_target(output, overwrite, gguf_file, is_dir=False)


__getattr__ = moved_main(__name__, "export")  # `gpt2_accel.export.main` keeps working


if __name__ == "__main__":  # `python -m gpt2_accel.export` runs the command, which lives in gpt2_accel/cli/
    from .cli.export import main

    raise SystemExit(main())
