"""Optimizers (AdamW; Muon + AdamW), their parameter groups, and learning-rate schedules (pure functions of the step).

``optim`` in the recipe picks the optimizer (transformers.TrainingArguments' key): ``adamw_torch`` is GPT-2's AdamW
on every parameter; ``muon`` is :class:`MuonWithAdamW`, torch's ``torch.optim.Muon`` on the 2-D hidden matrices of
the transformer blocks and AdamW on everything else (embeddings, LM head, gains, biases), the split of Keller
Jordan's Muon (https://kellerjordan.github.io/posts/muon/) and nanochat. Under DeepSpeed ZeRO-1/2 the same split
goes to DeepSpeed's own Muon (:func:`deepspeed_muon_with_adamw`), because ZeRO never hands an optimizer a whole
matrix. Under FSDP2 the same :class:`MuonWithAdamW` sees DTensor shards and orthogonalises each matrix whole on one
rank (:func:`fsdp2_muon_update`). :func:`check_optimizer_mode` refuses the modes where Muon cannot run correctly.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import torch
import torch.optim._muon as torch_muon
from torch import nn

from .recipe import RecipeError, TrainingArguments


def param_groups(model: nn.Module | list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: decay every >= 2-D tensor (matmul weights, embeddings), not biases or LayerNorm gains.

    This is GPT-3/nanoGPT's split; tied weights appear once because ``named_parameters`` de-duplicates them.
    ``model`` may also be a list of parameters (the non-Muon ones).
    """
    params = model.parameters() if isinstance(model, nn.Module) else model
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            # DeepSpeed ZeRO-3 partitions parameters into 1-D placeholders; ds_shape keeps the real shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adamw_kwargs(args: TrainingArguments, device_type: str) -> dict:
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        kwargs["fused"] = True  # one kernel for all parameters instead of a loop of small ops
    return kwargs


def build_optimizer(
    model: nn.Module, args: TrainingArguments, device_type: str, *, deepspeed: bool = False
) -> torch.optim.Optimizer:
    """The recipe's ``optim``: AdamW with the recipe's betas/eps (the fused kernel where torch has one for the
    device), or Muon + AdamW: :class:`MuonWithAdamW` in one process and under DDP, DeepSpeed's own Muon
    (:func:`deepspeed_muon_with_adamw`) when ``deepspeed`` (ZeRO-1/2; :func:`check_optimizer_mode` refuses the
    rest)."""
    if args.optim == "muon":
        muon, rest = muon_param_split(model)
        adamw_groups = [g for g in param_groups(rest, args.weight_decay) if g["params"]]
        muon_group = {"params": muon, "weight_decay": args.muon_weight_decay}
        if deepspeed:
            return deepspeed_muon_with_adamw(muon_group, adamw_groups, args, device_type)
        return MuonWithAdamW(
            [muon_group],
            adamw_groups,
            muon_kwargs=dict(lr=args.muon_learning_rate, momentum=args.muon_momentum, nesterov=True),
            adamw_kwargs=_adamw_kwargs(args, device_type),
        )
    return torch.optim.AdamW(param_groups(model, args.weight_decay), **_adamw_kwargs(args, device_type))


# ---------------------------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------------------------
def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """Muon orthogonalises whole weight matrices of the hidden layers (``transformer.h.*``, 2-D). Embeddings and
    the LM head are not hidden matrices (their rows are looked up / compared one token at a time: Jordan's post
    keeps them on AdamW), and 1-D gains and biases have nothing to orthogonalise."""
    ndim = len(getattr(p, "ds_shape", p.shape))
    return ndim == 2 and ".h." in f".{name}"


def muon_param_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the Muon matrices, every other trainable parameter), each tied parameter once."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if is_muon_param(name, p) else rest).append((name, p))
    return [p for _, p in muon], [p for _, p in rest]


def newton_schulz_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation (Jordan's post; torch.optim.Muon's iteration and
    coefficients), in float32 instead of torch's bfloat16.

    Why: on CPUs without bf16 matrix units bf16 matmuls are emulated; measured here (AMD EPYC, 1 thread), the
    demo's 16 block matrices take 16.8 s per step in bf16 and 1.3 s in fp32, which would make Muon slower than
    AdamW on CPU. On GPUs torch's bf16 iteration is kept.
    """
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # iterate on the wide orientation: the Gram matrix x @ x.T is the small one
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values start in [0, 1]
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = b * gram + c * (
            gram @ gram
        )  # the odd quintic a x + b x^3 + c x^5 applied to the singular values
        x = a * x + poly @ x
    return x.T if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some groups and ``torch.optim.AdamW`` on the others, as ONE optimizer.

    One object, because Accelerate, DeepSpeed and the checkpoint code expect one: ``param_groups`` lists both
    optimizers' groups (the same dicts, so the schedule's per-group ``lr`` reaches them; each carries
    ``use_muon``), ``state`` is shared, and ``state_dict``/``load_state_dict`` are torch's own over all groups.
    Accelerate's FSDP2 ``prepare`` swaps the parameters inside those dicts for their DTensor shards
    (``fsdp2_switch_optimizer_parameters``), so both halves follow; the Muon half then steps through
    :func:`fsdp2_muon_update` (whole-matrix Newton-Schulz), AdamW as before (elementwise, on the shards).
    """

    def __init__(
        self,
        muon_groups: list[dict],
        adamw_groups: list[dict],
        *,
        muon_kwargs: dict[str, Any],
        adamw_kwargs: dict[str, Any],
        ns_float32: bool | None = None,
    ):
        """``ns_float32``: orthogonalise in float32 (:func:`newton_schulz_float32`); None = when the Muon matrices
        live on the CPU, decided at each step (the trainer builds the optimizer before ``accelerator.prepare``
        moves the model to its GPU)."""
        for g in muon_groups:
            g["use_muon"] = True
        for g in adamw_groups:
            g["use_muon"] = False
        self._muon = torch.optim.Muon(muon_groups, **muon_kwargs)
        self._adamw = torch.optim.AdamW(adamw_groups, **adamw_kwargs)
        # torch's Optimizer keeps the very group dicts it is given: the sub-optimizers and this one share them
        super().__init__(self._muon.param_groups + self._adamw.param_groups, defaults={})
        self._link()
        self.ns_float32 = ns_float32

    def _link(self) -> None:
        self._muon.param_groups = [g for g in self.param_groups if g["use_muon"]]
        self._adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(
            state_dict
        )  # builds new group dicts and state: point the sub-optimizers at them
        self._link()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        float32 = self.uses_float32_ns()
        if any(_is_dtensor(p) for g in self._muon.param_groups for p in g["params"]):
            fsdp2_muon_update(self._muon, float32)
        elif float32:
            # torch.optim.Muon has no dtype option: swap its Newton-Schulz function for the float32 one during
            # this call only (looked up as a module global when the step runs)
            with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", newton_schulz_float32):
                self._muon.step()
        else:
            self._muon.step()
        self._adamw.step()
        return loss

    def uses_float32_ns(self) -> bool:
        """Whether the next step orthogonalises in float32: ``ns_float32``, or when None, whether the Muon matrices
        are on the CPU now (torch's bf16 iteration elsewhere)."""
        if self.ns_float32 is not None:
            return self.ns_float32
        return all(p.device.type == "cpu" for g in self._muon.param_groups for p in g["params"])


# ---------------------------------------------------------------------------------------------------------------
# Muon under FSDP2: whole-matrix orthogonalisation of sharded matrices
# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (torch ``fully_shard``) gives each of W ranks a block of rows of every matrix (a DTensor sharded on dim 0,
# torch.chunk layout: ceil(rows / W) rows per rank, the last ranks fewer or none), and the gradient arrives
# reduce-scattered the same way. Muon's momentum and Nesterov blend are elementwise, so they stay on the shards;
# Newton-Schulz is not: it needs the whole (rows, cols) update, and orthogonalising each shard alone gives a
# different, wrong update (tests/test_muon_fsdp2.py measures how different).
#
# How: the matrices are dealt round-robin to the ranks (largest first), as in "Muon is Scalable for LLM Training"
# (Liu et al. 2025, arXiv:2502.16982, Sec. 2.3 "Distributed Muon", which gathers each matrix within the
# data-parallel group) and in the distributed Muon of Jordan's modded-nanogpt (each rank orthogonalises its own
# share of the matrices, then the results are shared). Per round of W matrices: one all-to-all sends every
# rank's shard of matrix j to rank j, which reassembles and orthogonalises it whole; a second all-to-all sends each
# rank its rows of every result. Each rank then applies decay and the update to its own rows.
#
# Cost, for P Muon parameters in total: each rank sends and receives about 2 P (W-1) / W**2 elements per step
# (its shards out and back, and its own matrices in and out), against P (W-1) / W for gathering every matrix on
# every rank (``DTensor.full_tensor``, as the Moonlight paper's ZeRO-1 version does), which would also repeat all
# of Newton-Schulz W times; here each rank runs ~1/W of it. Peak extra memory: one round's shards plus one whole
# matrix. The elements travel in the dtype Newton-Schulz computes in (torch's bf16 on GPUs: torch.optim.Muon casts
# the update to bf16 first, elementwise, so casting before sending changes nothing; float32 on CPU).


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp2_shard_group(params: list[torch.Tensor]):
    """The process group over which FSDP2 shards the Muon matrices ``params`` (DTensors), or a clear error.

    Supported: every matrix sharded on dim 0 over the same 1-D mesh, FSDP2's layout. HSDP (a 2-D replicate x shard
    mesh) and tensor parallelism are other layouts that this code does not gather; refused rather than guessed.
    """
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    for p in params:
        if not isinstance(p, DTensor) or p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            layout = (
                f"{type(p).__name__}{tuple(getattr(p, 'placements', ()))}"
                if isinstance(p, DTensor)
                else "a plain tensor"
            )
            raise RecipeError(
                f"optim=muon under FSDP2 needs every Muon matrix sharded on dim 0 over one 1-D mesh (fully_shard's "
                f"layout); a matrix of shape {tuple(p.shape)} is {layout}. HSDP and tensor parallelism are not "
                "supported with Muon: shard over one mesh dimension, launch with accelerate_configs/ddp.yaml, or "
                "set optim=adamw_torch"
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise RecipeError(
                "optim=muon under FSDP2 needs all Muon matrices sharded over the same device mesh; they use several. "
                "Shard the whole model over one mesh, or set optim=adamw_torch"
            )
    return None if mesh is None else mesh.get_group()


@torch.no_grad()
def fsdp2_muon_update(muon: torch.optim.Muon, float32: bool) -> None:
    """One ``torch.optim.Muon`` step on FSDP2-sharded matrices, each orthogonalised whole (see the section comment).

    The same update as torch.optim.Muon's ``_single_tensor_muon`` on the whole matrix: momentum
    ``buf.lerp_(g, 1 - mu)``, Nesterov ``g.lerp(buf, mu)``, torch's Newton-Schulz (or
    :func:`newton_schulz_float32` when ``float32``), decoupled decay ``p *= 1 - lr * wd``, then
    ``p -= adjusted_lr * O`` with torch's own shape adjustment (``_adjust_lr``, on the global shape). The momentum
    buffer stays a sharded DTensor in ``muon.state`` (so DCP saves and reshards it like AdamW's moments).
    Collective: every rank of the shard group must call it.
    """
    import torch.distributed as dist

    # every matrix with a gradient, with its group. FSDP2 reduce-scatters every gradient on every rank, so the list
    # (hence the rounds below) is the same on all ranks.
    items = [(p, g) for g in muon.param_groups for p in g["params"] if p.grad is not None]
    if not items:
        return
    pg = fsdp2_shard_group([p for p, _ in items])
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    ns = newton_schulz_float32 if float32 else torch_muon._zeropower_via_newtonschulz
    wire = torch.float32 if float32 else torch.bfloat16  # the dtype each Newton-Schulz computes in

    def nesterov_update(p: torch.Tensor, group: dict) -> torch.Tensor:
        """Momentum and Nesterov on this rank's rows (elementwise: the shards' results are the whole's rows)."""
        state = muon.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        grad, buf = p.grad.to_local(), state["momentum_buffer"].to_local()
        buf.lerp_(grad, 1 - group["momentum"])
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        c = -(-p.shape[0] // world)  # torch.chunk's block of rows: rank r holds rows [r c, (r + 1) c)
        if update.shape[0] != max(0, min(c, p.shape[0] - rank * c)):
            raise RuntimeError(
                f"the FSDP2 shard of a {tuple(p.shape)} matrix has {update.shape[0]} rows on rank {rank}, not "
                "torch.chunk's layout: optim=muon under FSDP2 cannot reassemble the matrix with this torch version"
            )
        return _pad_rows(update.to(wire), c)

    # largest first, so each round's W matrices (one per rank) take about the same time; the order depends only on
    # the shapes and the parameter order, the same on every rank
    items.sort(key=lambda item: -item[0].numel())
    for start in range(0, len(items), world):
        round_ = items[start : start + world]
        updates = [nesterov_update(p, g) for p, g in round_]  # (c_j, cols_j) each, zero-padded
        sizes = [u.numel() for u in updates] + [0] * (world - len(round_))
        # 1) gather: my rows of matrix j go to rank j, which receives every rank's block, in rank order
        send = torch.cat([u.flatten() for u in updates])
        mine = rank < len(round_)
        recv_sizes = [sizes[rank] if mine else 0] * world
        recv = send.new_empty(sum(recv_sizes))
        dist.all_to_all_single(recv, send, recv_sizes, sizes, group=pg)
        # 2) orthogonalise my matrix of this round, whole (the blocks stacked in rank order, padding cut off)
        back = send.new_empty(0)
        if mine:
            p, group = round_[rank]
            c, cols = updates[rank].shape
            full = recv.view(world * c, cols)[: p.shape[0]]
            ortho = ns(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
            if ortho.dtype != wire:
                raise RuntimeError(
                    f"torch.optim.Muon's Newton-Schulz returned {ortho.dtype}, not {wire}: this torch version "
                    "changed it, and optim=muon under FSDP2 (gpt2_accel/optim.py) must follow"
                )
            back = _pad_rows(ortho, world * c).flatten()
        # 3) scatter: every rank gets its block of rows of each result of this round
        got = send.new_empty(sum(sizes))
        dist.all_to_all_single(got, back, sizes, recv_sizes, group=pg)
        # 4) decoupled decay, then the update scaled by torch's shape adjustment (of the whole matrix), on my rows
        for (p, group), u, piece in zip(round_, updates, got.split(sizes[: len(round_)]), strict=True):
            lr = float(group["lr"])
            local = p.to_local()
            local.mul_(1 - lr * group["weight_decay"])
            adjusted_lr = torch_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape)
            local.add_(piece.view(u.shape)[: local.shape[0]], alpha=-adjusted_lr)


def check_fsdp2_runs_muon(optimizer: torch.optim.Optimizer) -> str:
    """After Accelerate's FSDP2 ``prepare``: prove the Muon matrices reached the optimizer as FSDP2 shards it can
    reassemble (so :func:`fsdp2_muon_update` runs), never a silent per-shard Muon. Returns a line for the log."""
    import torch.distributed as dist

    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps ours
    muon = [p for g in inner.param_groups if g.get("use_muon") for p in g["params"]]
    if not isinstance(inner, MuonWithAdamW) or not muon or not all(_is_dtensor(p) for p in muon):
        raise RuntimeError(
            f"optim=muon under FSDP2: the optimizer is {type(inner).__name__} over "
            f"{sum(_is_dtensor(p) for p in muon)}/{len(muon)} sharded Muon matrices after accelerator.prepare; "
            "Muon would not see the FSDP2 shards it must reassemble. Launch with accelerate_configs/ddp.yaml or "
            "set optim=adamw_torch"
        )
    pg = fsdp2_shard_group(muon)
    return (
        f"MuonWithAdamW on {len(muon)} matrices sharded over {dist.get_world_size(pg)} ranks (FSDP2), each "
        "orthogonalised whole on one rank (round-robin)"
    )


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows``."""
    return x if x.shape[0] == rows else torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0]))


def set_lr(optimizer: torch.optim.Optimizer, step: int, args: TrainingArguments, max_steps: int) -> float:
    """Set every group's learning rate for ``step``; returns the AdamW (``learning_rate``) one.

    Muon groups follow the same schedule scaled to ``muon_learning_rate`` (its peak), as in Jordan's and nanochat's
    runs, where both optimizers share one warmup/decay shape.
    """
    lr = lr_at(step, args, max_steps)
    muon_scale = args.muon_learning_rate / args.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr * muon_scale if group.get("use_muon") else lr
    return lr


def check_optimizer_mode(
    args: TrainingArguments,
    mode: str,
    detail: str = "",
    *,
    zero_stage: int | None = None,
    offload_optimizer: bool = False,
    fsdp_version: int | None = None,
    offload_params: bool = False,
) -> None:
    """Refuse, before any step, a parallel mode in which the recipe's optimizer cannot run correctly.

    ``mode``: "deepspeed" (with its ``zero_stage`` and whether it offloads the optimizer to the CPU), "fsdp" (with
    its ``fsdp_version`` and whether it offloads the parameters to the CPU) or anything else (DDP, one process).
    Never a silent fallback: Muon runs under DeepSpeed ZeRO-1/2 without clipping and without optimizer offload
    (tested against DDP Muon, tests/test_muon_deepspeed.py) and under FSDP2 without parameter offload (whole-matrix
    Newton-Schulz, :func:`fsdp2_muon_update`, tested against one process, tests/test_muon_fsdp2.py); everything
    else is refused with the fix.
    """
    if args.optim != "muon":
        return
    if mode == "deepspeed":
        where = f"optim=muon cannot run under DeepSpeed{detail}"
        keep = "launch with accelerate_configs/ddp.yaml (GPUs) or cpu.yaml (CPU), or set optim=adamw_torch"
        if zero_stage not in (1, 2):
            why = (
                "ZeRO-3's Muon path (which DeepSpeed releases before 0.19 silently switched off under zero.Init) "
                "is not verified against DDP Muon here"
                if zero_stage == 3
                else "stage 0 shards nothing (it is data parallelism, where DeepSpeed releases before 0.19 "
                "silently ran plain SGD instead of Muon)"
            )
            raise RecipeError(
                f"{where}: {why}. Launch with accelerate_configs/deepspeed_zero1.yaml or deepspeed_zero2.yaml "
                f"(with max_grad_norm=0), or {keep}"
            )
        if offload_optimizer:
            raise RecipeError(
                f"{where}: with offload_optimizer_device set, Accelerate replaces the client optimizer by "
                "DeepSpeedCPUAdam, so Muon would silently become Adam. Set offload_optimizer_device: none, or "
                f"{keep}"
            )
        if args.max_grad_norm > 0:
            raise RecipeError(
                f"{where} with max_grad_norm={args.max_grad_norm}: DeepSpeed clips after orthogonalising, over "
                "the norm of Muon's update (about sqrt(min(rows, cols)) per matrix) instead of the gradient's, "
                "which would shrink every Muon step many times over. Set max_grad_norm=0 to keep DeepSpeed, "
                f"or {keep} (they clip the gradient)"
            )
        return
    if mode == "fsdp":
        keep = "or launch with accelerate_configs/ddp.yaml, or set optim=adamw_torch"
        if fsdp_version != 2:
            raise RecipeError(
                f"optim=muon cannot run under FSDP version {fsdp_version}{detail}: FSDP1 flattens the parameters "
                "into one flat shard per unit, so no rank can recover a weight matrix for Muon to orthogonalise "
                f"whole. Set fsdp_version: 2 in the launch config's fsdp_config (as accelerate_configs/fsdp.yaml), "
                f"{keep}"
            )
        if offload_params:
            raise RecipeError(
                f"optim=muon cannot run under FSDP2 with fsdp_offload_params: true{detail}: the optimizer then "
                "steps on CPU copies, and Muon's whole-matrix exchange between ranks is not verified there. Set "
                f"fsdp_offload_params: false, {keep}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Muon under DeepSpeed ZeRO-1/2
# ---------------------------------------------------------------------------------------------------------------
def deepspeed_muon_with_adamw(
    muon_group: dict, adamw_groups: list[dict], args: TrainingArguments, device_type: str
) -> torch.optim.Optimizer:
    """DeepSpeed's ``MuonWithAuxAdam`` over our split, for DeepSpeed as the client optimizer.

    Why DeepSpeed's Muon and not ``torch.optim.Muon``: ZeRO-1/2 steps the optimizer on one flat fp32 partition
    per group, so an optimizer inside ZeRO never sees a whole matrix. DeepSpeed 0.19 orthogonalises in ZeRO's
    gradient-partition code instead (runtime/zero/stage_1_and_2.py, ``get_flat_partition``: the whole reduced
    gradient of each Muon matrix, all-reduced among the ranks whose partitions it spans, goes through
    ``muon_update`` before it is cut into partitions), and only when the optimizer's class name says Muon and the
    parameter carries ``use_muon``. The optimizer's step then applies the decay and the learning rate.

    The update is torch.optim.Muon's (Keller Jordan's): momentum ``buf.lerp_(g, 1 - mu)``, Nesterov
    ``g.lerp(buf, mu)``, five quintic Newton-Schulz steps (3.4445, -4.775, 2.0315) on the Frobenius-normalised
    matrix, scaled by sqrt(max(1, rows/cols)) (torch's "original" adjustment), decay ``p *= 1 - lr * wd``.
    Differences, all at rounding level in fp32: the norm gets +1e-7 (torch clamps it at 1e-7); ``ns_method="gram"``
    iterates on the Gram matrix (the same polynomial, https://tridao.me/blog/2026/gram-newton-schulz/), in fp32
    on CPUs without fp16 matmul (as our CPU path) and in fp16 on GPUs (torch: bf16); DeepSpeed torch.compiles it.

    Why a client optimizer rather than DeepSpeed's config optimizer ``"muon"``: that one tags parameters by name
    (2-D and not named "embed"/"lm_head"), which would put our ``wte``/``wpe`` on Muon; this keeps our split
    (:func:`is_muon_param`), and the AdamW half is torch's AdamW with the recipe's betas/eps, as under DDP.
    """
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    adamw = _adamw_kwargs(args, device_type)
    for p in muon_group["params"]:
        p.use_muon = True  # read by ZeRO per parameter (the group key below is read by the optimizer)
    groups = [
        dict(
            muon_group,
            use_muon=True,
            lr=args.muon_learning_rate,
            momentum=args.muon_momentum,
            ns_method="gram",
        )
    ]
    for g in adamw_groups:
        for p in g["params"]:
            p.use_muon = False
        # betas/eps in every group: MuonWithAuxAdam fills missing ones with its own (0.9, 0.95) / 1e-10, which
        # would win over the AdamW kwargs
        groups.append(dict(g, use_muon=False, lr=adamw["lr"], betas=adamw["betas"], eps=adamw["eps"]))
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs=adamw)


def check_deepspeed_runs_muon(engine: Any) -> str:
    """After ``accelerator.prepare``: prove DeepSpeed steps Muon, never silently something else (its known traps:
    stage 0 ran plain SGD, ``zero.Init`` switched Muon off, Accelerate's offload swaps in CPU Adam). Returns the
    optimizer chain for the log; raises if DeepSpeed replaced the optimizer or will not orthogonalise."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    chain = f"{type(zero).__name__}({type(inner).__name__})"
    muon = [i for i, g in enumerate(getattr(inner, "param_groups", [])) if g.get("use_muon")]
    if (
        not isinstance(inner, MuonWithAuxAdam)
        or not hasattr(zero, "_is_muon_group")
        or not muon
        or not all(zero._is_muon_group(zero.bit16_groups[i]) for i in muon)
    ):
        raise RuntimeError(
            f"optim=muon: DeepSpeed built {chain}, which would not orthogonalise the Muon matrices; refusing to "
            "train with another optimizer than the recipe's. Launch with accelerate_configs/ddp.yaml or set "
            "optim=adamw_torch"
        )
    return chain


# ---------------------------------------------------------------------------------------------------------------
# Forced weight normalisation (EDM2, magnitude_preserving models)
# ---------------------------------------------------------------------------------------------------------------
def forced_weight_norm_params(model: nn.Module) -> list[nn.Parameter]:
    """The weights a magnitude-preserving model keeps normalised (modules marked ``forced_weight_norm``: its MP
    linears and embeddings), each tied weight once; empty for every other model."""
    seen, out = set(), []
    for module in model.modules():
        w = getattr(module, "weight", None)
        # trainable only: a LoRA-frozen base keeps the normalised weights it was saved with
        if (
            getattr(module, "forced_weight_norm", False)
            and w is not None
            and w.requires_grad
            and id(w) not in seen
        ):
            seen.add(id(w))
            out.append(w)
    return out


@torch.no_grad()
def renormalize_(params: list[nn.Parameter]) -> None:
    """EDM2's forced weight normalisation (Sec. 2.3, Config E): after each optimizer step, each stored row is put
    back to unit RMS, w <- w / (eps + ||w_row|| / sqrt(fan_in)). The forward normalises too, so this changes no
    output; it keeps the stored norm (hence the effective learning rate, update / ||w||) constant instead of
    growing with every update, and it makes what is saved already normalised."""
    from .modeling_gpt2_accel import mp_normalize

    for w in params:
        w.copy_(mp_normalize(w))


def attach_forced_weight_norm(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> None:
    """Re-normalise ``model``'s magnitude-preserving weights right after every ``optimizer.step()`` (a step
    post-hook on the optimizer, so it runs wherever the loop steps, and only on real steps: accumulation
    micro-steps and skipped non-finite steps do not step). Nothing for other models.

    ``mode``: accelerate's distributed type ("DEEPSPEED", "FSDP", "MULTI_CPU", "NO"...). Under DDP every rank holds the whole, identical weights and applies
    the same deterministic normalisation, so ranks stay equal. DeepSpeed keeps its own fp32 master copy of the
    weights inside its engine (and ZeRO-3 / FSDP shard them), so normalising the model's copy would be undone at the
    next step: refused, before any step runs.
    """
    params = forced_weight_norm_params(model)
    if not params:
        return
    mode = mode.lower()
    if mode in ("deepspeed", "fsdp"):
        raise RecipeError(
            f"magnitude_preserving=True cannot run under {'DeepSpeed' if mode == 'deepspeed' else 'FSDP'}: the "
            "re-normalisation after each step must write the weights the optimizer updates, and "
            f"{'DeepSpeed keeps them as its own fp32 partitions' if mode == 'deepspeed' else 'FSDP shards them'}. "
            "Launch with accelerate_configs/ddp.yaml (GPUs) or cpu.yaml (CPU), or set magnitude_preserving=false"
        )
    optimizer.register_step_post_hook(lambda opt, args, kwargs: renormalize_(params))


def lr_at(step: int, args: TrainingArguments, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the chosen decay to ``min_lr``.

    A pure function of the step, so a resumed run needs only the step to continue the schedule exactly.
    """
    peak, floor, warm = args.learning_rate, args.min_lr, args.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm  # (step + 1): the first step already trains with a non-zero lr
    kind = args.lr_scheduler_type
    if kind == "constant":
        return peak
    if kind == "warmup_stable_decay":
        # WSD (Hu et al. 2024, MiniCPM): constant after warmup, then a linear decay over the last decay_ratio.
        decay_steps = max(1, round(args.decay_ratio * max_steps))
        start = max(warm, max_steps - decay_steps)
        if step < start:
            return peak
        frac = min(1.0, (step - start + 1) / max(1, max_steps - start))
        return peak + frac * (floor - peak)
    if kind == "inverse_sqrt":
        # EDM2's decay (Sec. 2.3, with forced weight normalisation): lr = peak / sqrt(max(t / t_ref, 1)), t_ref =
        # inverse_sqrt_timescale (default: the warmup). No floor: min_lr is not used.
        t_ref = args.inverse_sqrt_timescale or max(1, warm)
        return peak / math.sqrt(max((step + 1) / t_ref, 1.0))
    span = max(1, max_steps - warm)
    frac = min(1.0, (step - warm) / span)
    if kind == "linear":
        return peak + frac * (floor - peak)
    # cosine (Loshchilov & Hutter 2017), as GPT-3 and nanoGPT use, ending at min_lr on the last step
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)
