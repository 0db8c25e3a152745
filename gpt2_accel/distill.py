"""Knowledge distillation from a frozen teacher: loading and checking the teacher, and the loss.

The loss is Hinton et al.'s (2015, "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531,
section 2): a mix of the data's cross-entropy and the KL divergence from the teacher's temperature-softened
next-token distribution to the student's, scaled by T^2 so its gradients keep their size when T changes::

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

averaged over the predicted positions (targets -100 are ignored, as in the CE). ``alpha`` is the recipe's
``distillation_alpha``, ``T`` its ``temperature``.

The KL needs the student's logits, so a distilling run turns the chunked LM-head loss (``skip_logits``) off and
materialises the (B, T, vocab) logits of both models; a chunked KL would save that memory but is not needed at the
sizes this toolkit distills (set per_device_train_batch_size lower if it does not fit).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .recipe import DistillationArguments, RecipeError

_PROBE = "Distillation needs one tokenizer: Hello, world! 12345 \u00e9t\u00e9"


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` for logits (B, T, V) and targets ``labels`` (B, T) aligned with them (-100 ignored).

    ``kl`` is the per-position mean of KL(teacher_T || student_T) before the T^2 scaling; computed in float32
    (float64 inputs stay float64) whatever the logits' precision."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype).flatten(0, -2)  # (B*T, V)
    t = teacher_logits.to(dtype).flatten(0, -2)  # (B*T, V)
    y = labels.reshape(-1)  # (B*T,)
    keep = y != -100
    ce = F.cross_entropy(s, y, ignore_index=-100)
    log_ps = F.log_softmax(s[keep] / temperature, dim=-1)  # (N, V) student, softened
    log_pt = F.log_softmax(t[keep] / temperature, dim=-1)  # (N, V) teacher, softened
    # sum_v p_t (log p_t - log p_s), then the mean over positions
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / keep.sum().clamp(min=1)
    loss = (1.0 - alpha) * ce + alpha * temperature**2 * kl
    return loss, ce, kl


def load_teacher(args: DistillationArguments, student: nn.Module, tokenizer, block_size: int) -> nn.Module:
    """The teacher named by ``teacher_model_name_or_path`` (anything ``init_from`` takes), frozen and in eval mode,
    after checking it shares the student's vocabulary (and tokenizer, where the teacher ships one)."""
    from .trainer import load_pretrained_for_training

    name = args.teacher_model_name_or_path
    try:
        teacher = load_pretrained_for_training(name, attn_implementation="sdpa")
    except Exception as e:  # any failure to load is a recipe error: the fix is the path
        msg = str(e).replace(f"init_from={name!r}: ", "")
        raise RecipeError(
            f"teacher_model_name_or_path={name!r} does not load: {msg}. Give an OpenAI GPT-2 name, one of our run "
            "or model directories, an exported GPT-2 directory, or a reachable Hub repo"
        ) from None
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise RecipeError(
            f"teacher_model_name_or_path={name!r} has vocab_size {tv} but the student has {sv}: distillation "
            "compares next-token distributions, so both must use the same tokenizer. Pick a teacher trained with "
            "the student's tokenizer_name"
        )
    _check_tokenizer(name, tokenizer)
    if teacher.config.n_positions < block_size:
        raise RecipeError(
            f"teacher_model_name_or_path={name!r} has a {teacher.config.n_positions}-token context but block_size "
            f"is {block_size}; lower block_size to {teacher.config.n_positions} or pick another teacher"
        )
    teacher.config.use_cache = False
    teacher.requires_grad_(False)  # never trained, never handed to the optimizer
    return teacher.eval()


def _check_tokenizer(name: str, tokenizer) -> None:
    """A teacher directory that ships a tokenizer must encode text as the student's does."""
    directory = Path(name)
    if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return
    from .tokenization import get_tokenizer

    try:
        theirs = get_tokenizer(str(directory))
    except Exception:
        return  # an unreadable tokenizer file: the vocab_size check above already passed
    if theirs.encode(_PROBE) != tokenizer.encode(_PROBE) or theirs.eot_token_id != tokenizer.eot_token_id:
        raise RecipeError(
            f"teacher_model_name_or_path={name!r} ships a tokenizer that differs from the student's "
            f"({tokenizer.name!r}): distillation needs one tokenizer. Set tokenizer_name to the teacher's"
        )


@torch.no_grad()
def teacher_logits(teacher: nn.Module, input_ids: torch.Tensor, autocast) -> torch.Tensor:
    """(B, T, V) logits of the frozen teacher, under the student's autocast (its precision)."""
    with autocast():
        return teacher(input_ids=input_ids, use_cache=False).logits
