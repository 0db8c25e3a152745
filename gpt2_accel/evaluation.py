"""Evaluation: loss/perplexity on any text data and HellaSwag accuracy, during training and from the command line.

- :func:`evaluate_loss` - mean next-token loss over packed windows (the trainer's validation windows), summed in
  float64 over all processes so 1 and N processes give the same number.
- :func:`load_hellaswag` / :func:`score_hellaswag` - HellaSwag scored completion-style as in Karpathy's
  build-nanogpt ``hellaswag.py`` and llm.c (see :func:`score_hellaswag` for the exact rule).
- :func:`main` - ``gpt2-accel eval``: any causal LM (our run directories, transformers checkpoints, Hub ids) on a
  dataset or HellaSwag, optionally from a recipe (``recipes/eval_gpt2*.yaml``), under ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import weakref
from datetime import UTC
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._compat import moved_main
from .locate import OPENAI_GPT2, find_model_dir

# The OpenAI GPT-2 checkpoints: their tokenizer is GPT-2's BPE, which we build offline from the bundled files.
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
_HELLASWAG_FIELDS = ("ctx", "endings", "label")


# ---------------------------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------------------------


def _sum_over_ranks(t: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Sum ``t`` over all processes (a no-op in a single process)."""
    if accelerator is not None:
        if accelerator.num_processes > 1:
            return accelerator.reduce(t, reduction="sum")
        return t
    if _distributed():
        t = t.clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _steps_over_ranks(local_steps: int, device) -> int:
    """The largest number of forward passes any rank makes. Ranks with fewer run dummy passes, because sharded
    models (FSDP, DeepSpeed ZeRO-3) gather parameters collectively in every forward and would hang otherwise."""
    if _distributed():
        t = torch.tensor([local_steps], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())
    return local_steps


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _model_config(model):
    # A DDP/compiled wrapper hides .config behind .module / ._orig_mod.
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and getattr(m, "config", None) is not None:
            return m.config
    return None


def _max_positions(model) -> int | None:
    cfg = _model_config(model)
    if cfg is None:
        return None
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------------------------
# loss / perplexity
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model, windows: torch.LongTensor, *, batch_size: int, accelerator=None) -> dict:
    """Mean next-token loss of ``model`` over packed ``windows`` ((n, block_size + 1) token ids) on this rank.

    Window row ``w`` is scored as input ``w[:-1]`` -> targets ``w[1:]`` (the same windows the trainer trains on).
    The summed loss and the token count are accumulated in float64 and summed over all processes (through
    ``accelerator.reduce`` or ``torch.distributed``), so every rank returns the same
    ``{"loss", "perplexity", "tokens"}`` and the result does not depend on the number of processes (to float32
    rounding of the logits). Works with any model whose output has ``.logits`` (DDP-wrapped too); the training
    mode is restored. Collective: with an initialised process group, call it on every rank (never inside
    ``if is_main_process``), or the ranks wait for each other forever.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if windows.dim() != 2 or windows.size(1) < 2:
        raise ValueError(
            f"windows must be a (n, block_size + 1) tensor of token ids with block_size >= 1, got shape "
            f"{tuple(windows.shape)}"
        )
    device = accelerator.device if accelerator is not None else _model_device(model)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, number of tokens]
    n_steps = math.ceil(windows.size(0) / batch_size)
    try:
        for step in range(_steps_over_ranks(n_steps, device)):
            if (
                step >= n_steps
            ):  # this rank is done: a dummy forward keeps sharded models in step with the others
                model(input_ids=torch.zeros(1, windows.size(1) - 1, dtype=torch.long, device=device))
                continue
            batch = windows[step * batch_size : (step + 1) * batch_size].to(device)  # (B, T + 1)
            inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
            logits = model(input_ids=inputs).logits  # (B, T, V)
            token_loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
            )  # (B * T,)
            # float64 accumulation: the sum over millions of tokens stays exact to ~1e-12, so sharding the same
            # windows over a different number of processes cannot change the result beyond float32 logit noise.
            sums[0] += token_loss.double().sum()
            sums[1] += targets.numel()
    finally:
        model.train(was_training)
    sums = _sum_over_ranks(sums, accelerator)
    tokens = round(sums[1].item())
    loss = sums[0].item() / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": _perplexity(loss), "tokens": tokens}


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:  # loss > ~709 nats: an untrained or diverged model
        return float("inf")


# ---------------------------------------------------------------------------------------------------------------
# HellaSwag
# ---------------------------------------------------------------------------------------------------------------


def _normalize_hellaswag(example: dict, where: str) -> dict:
    missing = [k for k in _HELLASWAG_FIELDS if k not in example]
    if missing:
        raise ValueError(
            f"{where}: HellaSwag example lacks field(s) {missing}; expected the official jsonl format "
            f"(ind, activity_label, ctx_a, ctx_b, ctx, split, split_type, label, endings, source_id), "
            f"e.g. {HELLASWAG_URL}"
        )
    endings = list(example["endings"])
    if len(endings) != 4:
        raise ValueError(f"{where}: HellaSwag example has {len(endings)} endings, expected 4")
    try:
        label = int(example["label"])  # an int in the official jsonl, a string in the Hub dataset
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: HellaSwag label {example['label']!r} is not 0-3; the test split has no labels, use the "
            "validation split"
        ) from None
    if not 0 <= label < 4:
        raise ValueError(f"{where}: HellaSwag label {label} is not in 0-3")
    return {**example, "endings": endings, "label": label}


@lru_cache(maxsize=8)
def _load_hellaswag_cached(source: str, max_examples: int | None, split: str) -> tuple[dict, ...]:
    path = Path(source)
    out: list[dict] = []
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if max_examples is not None and len(out) >= max_examples:
                    break
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{source}:{lineno}: not valid JSON ({e}); expected one example per line"
                    ) from None
                out.append(_normalize_hellaswag(raw, f"{source}:{lineno}"))
        return tuple(out)
    if path.is_dir():
        raise IsADirectoryError(f"HellaSwag source {source!r} is a directory; pass the jsonl file inside it")
    if path.suffix in (".jsonl", ".json") or source.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"HellaSwag file {source!r} not found; download the validation set from {HELLASWAG_URL} "
            "and pass its path, or pass a Hub dataset id such as 'Rowan/hellaswag'"
        )
    try:
        from datasets import load_dataset

        ds = load_dataset(source, split=split, streaming=True)
        for i, raw in enumerate(ds):
            if max_examples is not None and len(out) >= max_examples:
                break
            out.append(_normalize_hellaswag(dict(raw), f"{source}[{split}][{i}]"))
    except ValueError:
        raise
    except Exception as e:  # offline, unknown id, script-only dataset...
        raise RuntimeError(
            f"could not load HellaSwag from the Hub dataset {source!r} (split {split!r}): {e.__class__.__name__}: "
            f"{e}. Offline, download {HELLASWAG_URL} once and pass the file path instead"
        ) from e
    return tuple(out)


def load_hellaswag(source: str, max_examples: int | None = None, *, split: str = "validation") -> list[dict]:
    """HellaSwag examples from the official jsonl (a path) or a Hub dataset id (``split``, default validation).

    Labels become ints and every example is checked to have ``ctx``, 4 ``endings`` and a ``label``. Results are
    cached per (source, max_examples, split), so calling this at every evaluation during training is free.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    return list(_load_hellaswag_cached(str(source), max_examples, split))


def _encode(tokenizer, text: str) -> list[int]:
    from .tokenization import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text)
    if hasattr(tokenizer, "encode_ordinary"):  # a tiktoken Encoding
        return tokenizer.encode_ordinary(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # a transformers tokenizer


# tokenizer -> {(ctx, endings): (ctx_ids, [ending_ids x 4])}; weak keys so a dropped tokenizer frees its cache.
_RENDER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def render_hellaswag(example: dict, tokenizer) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each ending, the latter encoded as ``" " + ending`` (as build-nanogpt:
    GPT-2's BPE attaches the space to the following word). Cached per tokenizer."""
    key = (example["ctx"], tuple(example["endings"]))
    try:
        cache = _RENDER_CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        cache = {}
    hit = cache.get(key)
    if hit is None:
        hit = (_encode(tokenizer, example["ctx"]), [_encode(tokenizer, " " + e) for e in example["endings"]])
        cache[key] = hit
    return hit


def _hellaswag_rows(example: dict, tokenizer, max_len: int | None) -> list[tuple[list[int], int]]:
    """The 4 candidate rows (context + ending ids) with the number of ending tokens, left-truncated to fit."""
    ctx, endings = render_hellaswag(example, tokenizer)
    rows = []
    for end in endings:
        if not end:
            raise ValueError(
                f"HellaSwag example {example.get('ind', '?')} has an empty ending; nothing to score"
            )
        row = ctx + end
        if max_len is not None and len(row) > max_len:
            row = row[-max_len:]  # drop the oldest context tokens; the ending is what is scored
        rows.append((row, min(len(end), len(row) - 1)))
    return rows


@torch.no_grad()
def score_hellaswag(
    model,
    tokenizer,
    examples: list[dict],
    *,
    rank: int = 0,
    world_size: int = 1,
    accelerator=None,
    batch_size: int = 8,
    return_details: bool = False,
) -> dict:
    """HellaSwag accuracy, completion style (build-nanogpt ``hellaswag.py`` / llm.c).

    For each example the context is followed by each of the 4 endings (``" " + ending``); the model's cross
    entropy is taken over the ending tokens only (the first one predicted from the last context token).
    ``acc`` counts examples whose label has the lowest **summed** ending loss, ``acc_norm`` those whose label has
    the lowest **mean** (per-token) ending loss; ties go to the lower index (``argmin``).

    Example ``i`` is scored on rank ``i % world_size`` (``rank``/``world_size`` come from ``accelerator`` when
    given) and the counts are summed over all processes, so every rank returns the totals
    ``{"acc", "acc_norm", "n"}``. Without an accelerator or an initialised process group the counts are this
    rank's only. ``batch_size`` is in examples (4 rows each). ``return_details`` adds this rank's per-example
    ``details``: ind, label, pred, pred_norm, sum_losses, mean_losses. Collective like :func:`evaluate_loss`:
    with an initialised process group, call it on every rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if accelerator is not None:
        rank, world_size = accelerator.process_index, accelerator.num_processes
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    device = accelerator.device if accelerator is not None else _model_device(model)
    max_len = _max_positions(model)
    mine = examples[rank::world_size]
    rendered = [_hellaswag_rows(ex, tokenizer, max_len) for ex in mine]
    # Batch examples of similar length together: less padding, and the scores do not depend on the order.
    order = sorted(range(len(mine)), key=lambda i: max(len(r) for r, _ in rendered[i]))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # [correct, correct_norm, n]
    details: dict[int, dict] = {}
    was_training = model.training
    model.eval()
    n_steps = math.ceil(len(order) / batch_size)
    try:
        for step in range(_steps_over_ranks(n_steps, device)):
            if step >= n_steps:  # dummy forward for sharded models, see _steps_over_ranks
                model(input_ids=torch.zeros(4, 2, dtype=torch.long, device=device))
                continue
            idx = order[step * batch_size : (step + 1) * batch_size]
            rows = [row for i in idx for row in rendered[i]]  # 4 rows per example
            width = max(len(r) for r, _ in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal, never attended
            mask = torch.zeros(len(rows), width, dtype=torch.bool)  # True where a target is an ending token
            for j, (row, n_end) in enumerate(rows):
                tokens[j, : len(row)] = torch.tensor(row)
                mask[j, len(row) - n_end : len(row)] = True
            tokens, mask = tokens.to(device), mask.to(device)
            logits = model(input_ids=tokens).logits  # (R, L, V)
            losses = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                tokens[:, 1:].reshape(-1),
                reduction="none",
            ).view(len(rows), width - 1)  # (R, L - 1): loss of predicting token t + 1 from position t
            target_mask = mask[:, 1:]  # (R, L - 1)
            sum_loss = (losses.double() * target_mask).sum(dim=1)  # (R,)
            mean_loss = sum_loss / target_mask.sum(dim=1)  # (R,)
            sum_loss, mean_loss = sum_loss.view(-1, 4), mean_loss.view(-1, 4)  # (examples, 4)
            pred, pred_norm = sum_loss.argmin(dim=1), mean_loss.argmin(dim=1)
            labels = torch.tensor([mine[i]["label"] for i in idx], device=device)
            counts[0] += (pred == labels).sum()
            counts[1] += (pred_norm == labels).sum()
            counts[2] += len(idx)
            if return_details:
                for k, i in enumerate(idx):
                    details[i] = {
                        "ind": mine[i].get("ind"),
                        "label": mine[i]["label"],
                        "pred": int(pred[k]),
                        "pred_norm": int(pred_norm[k]),
                        "sum_losses": sum_loss[k].tolist(),
                        "mean_losses": mean_loss[k].tolist(),
                    }
    finally:
        model.train(was_training)
    counts = _sum_over_ranks(counts, accelerator)
    correct, correct_norm, n = (round(c) for c in counts.tolist())
    out: dict[str, Any] = {
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
        "n": n,
    }
    if return_details:
        out["details"] = [details[i] for i in range(len(mine))]
    return out


# ---------------------------------------------------------------------------------------------------------------
# models and tokenizers
# ---------------------------------------------------------------------------------------------------------------


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Any causal LM: our run/model directories, transformers checkpoints (vanilla GPT-2 included), Hub ids.

    Our own model type is registered on import (no remote code needed). Other repositories that ship their own
    modeling code need ``trust_remote_code=True`` (it runs code from the repository: only for sources you trust).
    """
    from transformers import AutoModelForCausalLM

    import gpt2_accel  # noqa: F401  (registers GPT2AccelConfig / GPT2AccelForCausalLM with the Auto classes)

    path = Path(name_or_path)
    if path.exists():
        name_or_path = str(find_model_dir(path))
    elif name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory {name_or_path!r} does not exist; check --model / init_from")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ValueError(
                f"model {name_or_path!r} ships its own modeling code; rerun with --trust_remote_code if you trust "
                "its source"
            ) from e
        raise
    except OSError as e:
        raise OSError(
            f"could not load model {name_or_path!r} ({e.__class__.__name__}: {e}). Offline, pass a local "
            "directory written by save_pretrained (e.g. `gpt2-accel convert` output or a run directory)"
        ) from e
    return model.eval()


def default_tokenizer_name(model_name: str) -> str:
    """The tokenizer that goes with a model: its own files if it is a directory that has them, the bundled GPT-2
    BPE for OpenAI's checkpoints, else the Hub id itself."""
    path = Path(model_name)
    if path.is_dir():
        model_dir = find_model_dir(path)
        if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
            return str(model_dir)
        return "gpt2"
    if model_name in OPENAI_GPT2:
        return "gpt2"
    return model_name


def _check_compatible(model, tokenizer, block_size: int | None) -> None:
    cfg = _model_config(model)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model only {vocab}; pass the "
            "model's tokenizer with --tokenizer (or tokenizer_name in the recipe)"
        )
    n_pos = _max_positions(model)
    if block_size is not None and n_pos is not None and block_size > n_pos:
        raise ValueError(
            f"block_size={block_size} is longer than the model's context ({n_pos}); lower --block_size"
        )


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------


def save_results(output: str | Path, result: dict) -> Path:
    """Write ``result`` as JSON (atomically) with when and with what it was computed.

    The same fields ``evaluate.save`` wrote (_timestamp, _python_version) plus our version, without running git (which
    printed "fatal: not a git repository" outside a checkout)."""
    import platform
    from datetime import datetime

    from . import __version__
    from .atomic import write_json

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "_timestamp": datetime.now(UTC).isoformat(),
        "_python_version": platform.python_version(),
        "_gpt2_accel_version": __version__,
    }
    write_json(out, {**result, **meta})
    return out


__getattr__ = moved_main(__name__, "eval")  # `gpt2_accel.evaluation.main` keeps working


if (
    __name__ == "__main__"
):  # `python -m gpt2_accel.evaluation` runs the command, which lives in gpt2_accel/cli/
    from .cli.eval import main

    raise SystemExit(main())
