"""The training loop around Accelerate, the only module that touches ``accelerator``.

``Trainer._train`` is the loop: one optimizer step (``_train_step``; the update itself is ``_optimizer_step``), then
the logger, the validator and the checkpointer (gpt2_accel/loop.py) each decide whether they act at this step.
``_build`` is the set-up, a sequence of small named steps. Process-wide settings (logging, TF32) belong to the
program: ``gpt2_accel.train.configure_process``.

``Trainer(recipe).train()`` is what ``accelerate launch -m gpt2_accel.train recipe.yaml`` and
``gpt2-accel train`` run; scripts and notebooks use it directly (``Trainer.from_recipe_file(path, **overrides)``
or ``Trainer(n_layer=2, max_steps=10, ...)``). Parallelism (DDP, FSDP, DeepSpeed) comes from the launch config
through ``accelerator.prepare``; the model never knows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import run_files
from .locate import OPENAI_GPT2
from .logs import quiet_save
from .loop import Periodic, TrainLogger
from .metrics import JsonlTracker, flops_per_token, peak_flops, plot_loss_curve
from .optim import (
    attach_forced_weight_norm,
    build_optimizer,
    check_deepspeed_runs_muon,
    check_fsdp2_runs_muon,
    check_optimizer_mode,
    set_lr,
)
from .recipe import Recipe, RecipeError, build_recipe, load_recipe
from .run_files import TrainerState

logger = logging.getLogger("gpt2_accel")

# How gloo / NCCL report a peer that died (closed socket) or hung (timeout) inside a collective.
_PEER_FAILURE = re.compile(
    r"timed out|timeout|connection (closed|reset)|broken pipe|peer|NCCL", re.IGNORECASE
)


class TrainerCallback:
    """Override any hook; each receives the trainer. Called on the main process only (logs are already reduced)."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, logs: dict[str, Any]) -> None: ...
    def on_evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...
    def on_save(self, trainer: Trainer, checkpoint_dir: Path) -> None: ...
    def on_train_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm was NaN/inf (on_nonfinite='error')."""


class Trainer:
    def __init__(
        self, recipe: Recipe | None = None, *, callbacks: list[TrainerCallback] | None = None, **keys: Any
    ):
        """Build from a :class:`Recipe` or from recipe keys (``Trainer(n_layer=2, max_steps=10)``)."""
        if recipe is None:
            recipe = build_recipe(keys)
        elif keys:
            raise TypeError("pass either a Recipe or recipe keys, not both")
        self.recipe = recipe
        self.callbacks = list(callbacks or [])
        self.state = TrainerState()
        self._stop_signal: int | None = None
        self._built = False

    @classmethod
    def from_recipe_file(
        cls, path: str | os.PathLike, overrides: list[str] | dict[str, Any] | None = None, **kw
    ) -> Trainer:
        return cls(load_recipe(path, overrides), **kw)

    # ------------------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything (accelerator, data, model, optimizer; resume state). ``train()`` calls it too."""
        self._setup()

    def _setup(self) -> None:
        if self._built:
            return
        try:
            self._build()
        except BaseException:
            self._close()  # a refused or failed set-up leaves no lock held and no worker running
            raise

    def _build(self) -> None:
        """Building, in order; each step uses what the ones before made. Data comes before the model: a missing
        file, a bad column or an empty dataset is reported before any weights are built or downloaded."""
        from accelerate.utils import set_seed

        self._build_accelerator()
        self._claim_output_dir()
        self._configure_launch()
        resume_dir = self._find_resume_dir()
        if resume_dir is not None:
            from .lora import check_resume

            check_resume(resume_dir, self.recipe.peft.use_peft)
        set_seed(
            self.recipe.training.seed
        )  # same init on every rank; per-rank RNG streams come back on resume
        self._build_data(resume_dir)
        self._build_training_model(resume_dir)
        self._build_optimizer_and_prepare()
        self._resume_or_start(resume_dir)
        self._init_trackers()
        self._built = True

    def _build_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        from .parallel import launch_request, process_group_backend, wants_cpu

        t = self.recipe.training
        self.output_dir = Path(t.output_dir)
        self.trackers = [
            x for x in t.report_to if x != "none"
        ]  # besides metrics.jsonl, which every run writes
        self.launch = launch_request()  # what accelerate launch / torchrun was asked for
        # A dead or hung rank fails the others' collectives after ddp_timeout instead of blocking them for ever.
        pg_kwargs = InitProcessGroupKwargs(
            backend=process_group_backend(self.launch), timeout=timedelta(seconds=t.ddp_timeout)
        )
        self.accelerator = acc = Accelerator(
            kwargs_handlers=[pg_kwargs],
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision="bf16"
            if t.bf16
            else "fp16"
            if t.fp16
            else None,  # None: the launch config decides
            log_with=[JsonlTracker(self.output_dir), *self.trackers],
            project_dir=str(self.output_dir),
            cpu=wants_cpu(self.launch),  # multi-process gloo on CPU (see parallel.wants_cpu)
        )
        self._check_world(acc)
        self.is_main = acc.is_main_process

    def _configure_launch(self) -> None:
        """Log the launch; hand our batch settings to DeepSpeed; refuse what this launch cannot run."""
        from accelerate.utils import DistributedType

        acc, r, t = self.accelerator, self.recipe, self.recipe.training
        dist = acc.distributed_type
        logger.info(
            "launch: distributed_type=%s processes=%d machines=%s mixed_precision=%s device=%s",
            dist.value if hasattr(dist, "value") else dist,
            acc.num_processes,
            self.launch.num_machines or 1,
            acc.mixed_precision,
            acc.device,
        )
        self._deepspeed = dist == DistributedType.DEEPSPEED
        if self._deepspeed:
            # Our batch settings are the single source of truth; DeepSpeed needs them in its own config.
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = t.per_device_train_batch_size
            ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
            ds["train_batch_size"] = (
                t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes
            )
            # DeepSpeed clips inside its step (clip_grad_norm_ only reports the norm); 0 turns clipping off.
            ds["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm > 0 else 0.0
            if t.on_nonfinite == "skip":
                logger.warning(
                    "on_nonfinite=skip cannot skip under DeepSpeed: it updates the weights inside backward, before "
                    "the trainer sees the gradient norm; a non-finite step stops the run instead"
                )

        if r.peft.use_peft:
            from .lora import check_launch

            check_launch(dist, acc.state.deepspeed_plugin.zero_stage if self._deepspeed else None)
        if self._deepspeed:
            zero = acc.state.deepspeed_plugin.zero_stage
            zero_cfg = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            offload = zero_cfg.get("offload_optimizer", {}).get("device", "none")
            check_optimizer_mode(
                t,
                "deepspeed",
                f" (ZeRO stage {zero}, from {self.launch.source or 'the launch'})",
                zero_stage=zero,
                offload_optimizer=offload not in (None, "none"),
            )
        elif dist == DistributedType.FSDP:
            from torch.distributed.fsdp import CPUOffloadPolicy

            plugin = acc.state.fsdp_plugin
            check_optimizer_mode(
                t,
                "fsdp",
                f" (from {self.launch.source or 'the launch'})",
                fsdp_version=plugin.fsdp_version,
                # FSDP2's "no offload" is a plain OffloadPolicy(); offloading is its CPUOffloadPolicy subclass
                offload_params=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
            )

    def _build_data(self, resume_dir: Path | None) -> None:
        """Tokenizer, block size, batch and step counts, the training loader and the validation windows."""
        from .data import build_eval_windows, build_train_loader, check_block_size
        from .tokenization import get_tokenizer

        acc, r, t = self.accelerator, self.recipe, self.recipe.training
        self.tokenizer = get_tokenizer(r.data.tokenizer_name)
        n_positions = self._model_n_positions(resume_dir)
        self.block_size = r.data.block_size or n_positions
        try:
            check_block_size(self.block_size, n_positions)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        self.global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * acc.num_processes
        self.tokens_per_step = self.global_batch * self.block_size
        self.max_steps = t.max_steps
        if t.max_train_tokens is not None:
            self.max_steps = math.ceil(t.max_train_tokens / self.tokens_per_step)
        self.train_loader = build_train_loader(
            r.data,
            self.tokenizer,
            block_size=self.block_size,
            batch_size=t.per_device_train_batch_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=t.seed,
            grad_accum=t.gradient_accumulation_steps,
        )
        self.eval_windows = build_eval_windows(
            r.data,
            self.tokenizer,
            block_size=self.block_size,
            max_samples=r.data.max_eval_samples,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        n_eval = torch.tensor(len(self.eval_windows), device=acc.device)
        self.has_eval = bool(acc.reduce(n_eval, reduction="sum").item() > 0)
        if not self.has_eval:
            logger.warning(
                "no validation data (validation_split_percentage=0 and no validation split): no evals"
            )

    def _build_training_model(self, resume_dir: Path | None) -> None:
        """The model to train (with LoRA / a distillation teacher as the recipe says), not yet prepared."""
        from accelerate.utils import DistributedType

        acc, r, t = self.accelerator, self.recipe, self.recipe.training
        self.model = self._build_model(resume_dir)
        cfg = self.model.config
        # The chunked LM head + loss never materialises the (B*T, vocab) logits (modeling: skip_logits). It reads
        # the tied weight inside forward, which ZeRO-3 and FSDP would have re-sharded after the embedding ran.
        sharded = self._deepspeed and acc.state.deepspeed_plugin.zero_stage == 3
        sharded |= acc.distributed_type == DistributedType.FSDP
        self._sharded = sharded
        self.skip_logits = not sharded
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise RecipeError(
                f"tokenizer {r.data.tokenizer_name!r} has {self.tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {cfg.vocab_size}; set vocab_size >= {self.tokenizer.vocab_size} or change tokenizer_name"
            )
        if t.gradient_checkpointing:
            # transformers >= 5.2x renamed it; keep working on both
            enable = (
                getattr(self.model, "activation_checkpointing_enable", None)
                or self.model.gradient_checkpointing_enable
            )
            enable()
        self.teacher = None
        if r.distillation.teacher_model_name_or_path:
            from .distill import load_teacher

            self.teacher = load_teacher(r.distillation, self.model, self.tokenizer, self.block_size)
            self.skip_logits = False  # the KL term needs the student's logits (see distill.py)
        if r.peft.use_peft:
            self.model = self._wrap_lora(resume_dir)

    def _build_optimizer_and_prepare(self) -> None:
        """The optimizer, ``accelerator.prepare`` (the one seam to DDP / FSDP / DeepSpeed), the EMAs, the FLOP count."""
        acc, t, cfg = self.accelerator, self.recipe.training, self.model.config
        # Counted before prepare: ZeRO-3 / FSDP leave each rank only its shard of every parameter.
        wpe = self.model.transformer.wpe  # None with rotary positions
        n_params = sum(p.numel() for p in self.model.parameters()) - (
            wpe.weight.numel() if wpe is not None else 0
        )
        self.optimizer = build_optimizer(self.model, t, acc.device.type, deepspeed=self._deepspeed)
        attach_forced_weight_norm(self.model, self.optimizer, acc.distributed_type.value)  # EDM2 models only
        model = self.model
        if t.torch_compile:
            model = torch.compile(model)
        self.model_engine, self.optimizer = acc.prepare(model, self.optimizer)
        if self._deepspeed and t.optim == "muon":
            logger.info("optimizer: DeepSpeed %s", check_deepspeed_runs_muon(self.model_engine))
        elif self._sharded and t.optim == "muon":  # FSDP2 (check_optimizer_mode refused FSDP1)
            logger.info("optimizer: %s", check_fsdp2_runs_muon(self.optimizer))
        if self.teacher is not None:
            # on every rank, never prepared (no DDP wrapper, no optimizer), in the student's dtype
            dtype = next(self.model_engine.parameters()).dtype
            self.teacher.to(device=acc.device, dtype=dtype)
        self.ema = self._build_ema(self._sharded)

        self.flops_per_token = flops_per_token(n_params, cfg.n_layer, cfg.n_embd, self.block_size)
        precision = acc.mixed_precision if acc.mixed_precision in ("bf16", "fp16") else "fp32"
        if acc.device.type == "cuda" and precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            precision = "tf32"
        self.peak_flops, self.peak_source = peak_flops(acc.device, precision)
        logger.info(
            "model: %.2fM parameters (%s), block_size=%d, global batch=%d windows = %d tokens/step, max_steps=%d",
            n_params / 1e6,
            cfg.attn_type,
            self.block_size,
            self.global_batch,
            self.tokens_per_step,
            self.max_steps,
        )

    def _resume_or_start(self, resume_dir: Path | None) -> None:
        """Load the checkpoint to resume from, or start a fresh metrics.jsonl; save the recipe with the run."""
        if resume_dir is not None:
            self._load_checkpoint(resume_dir)
        elif self.is_main:
            (self.output_dir / run_files.METRICS).unlink(missing_ok=True)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.output_dir / run_files.RECIPE, self.recipe.to_yaml())

    def _init_trackers(self) -> None:
        t, trackers = self.recipe.training, self.trackers
        # trackers take scalars only (tensorboard's hparams refuse None and lists); metrics.jsonl needs none: the
        # run directory holds recipe.yaml
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in self.recipe.flat().items()
        }
        # wandb's files live with the run, not in the working directory (unless WANDB_DIR says otherwise)
        init_kwargs = {"wandb": {"dir": os.environ.get("WANDB_DIR", str(self.output_dir))}}
        try:
            self.accelerator.init_trackers(
                t.run_name or self.output_dir.name,
                config=hparams if trackers else None,
                init_kwargs=init_kwargs,
            )
        except Exception as e:
            if "wandb" in trackers and "api key" in str(e).lower():
                raise RecipeError(
                    "report_to includes wandb but wandb has no API key: run `wandb login`, set WANDB_API_KEY, "
                    "or set WANDB_MODE=offline to log locally (sync later with `wandb sync`)"
                ) from None
            raise

    def _build_ema(self, sharded: bool):
        """The post-hoc EMAs (gpt2_accel/ema.py), kept by the main process; None when ema_sigma_rels is off."""
        t = self.recipe.training
        if not t.ema_sigma_rels:
            return None
        if sharded:
            raise RecipeError(
                "ema_sigma_rels cannot be tracked under ZeRO-3 or FSDP (each rank holds only shards of the weights); "
                "use ddp.yaml or deepspeed_zero1/2.yaml, or set ema_sigma_rels=null"
            )
        from .ema import PowerEMA

        return PowerEMA(self.model, t.ema_sigma_rels) if self.is_main else None

    def _check_world(self, acc) -> None:
        """Refuse a launch whose world differs from what was asked: a silent fallback trains N separate models."""
        from .parallel import check_world

        check_world(self.launch, acc.num_processes, acc.distributed_type)

    def _claim_output_dir(self) -> None:
        """One writer per run directory (runlock.py): the main process checks output_dir is ours and writable, then
        locks it for the life of the run. Every rank raises the same error if that fails."""
        from .runlock import RunLock

        t = self.recipe.training
        self._run_lock = None

        def claim() -> None:
            ckpt.check_output_dir(self.output_dir, RunLock(self.output_dir).path.name)  # reads only
            try:
                self._run_lock = RunLock(self.output_dir, force=t.force_unlock).acquire()
            except OSError:  # the lock file could not even be created: say why, with the fix
                ckpt.check_writable(self.output_dir)
                raise
            ckpt.check_writable(self.output_dir)  # after the lock: a refused second run writes nothing at all

        self._on_main(claim)

    def _on_main(self, fn):
        """Run ``fn`` on the main process and hand its result (or its exception) to every rank. Collective."""
        out: list[Any] = [None, None]
        if self.is_main:
            try:
                out = [fn(), None]
            except Exception as e:
                out = [None, e]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(out)
        if out[1] is not None:
            raise out[1]
        return out[0]

    def _close(self) -> None:
        """Stop the data workers and give the run directory up. Every exit path of set-up and train() calls it."""
        loader = getattr(self, "train_loader", None)
        if loader is not None:
            loader.close()
        self._restore_signal_handlers()
        lock = getattr(self, "_run_lock", None)
        if lock is not None:
            lock.release()

    def _find_resume_dir(self) -> Path | None:
        t, m = self.recipe.training, self.recipe.model
        if t.resume_from_checkpoint not in (None, "auto", "never"):
            path = Path(t.resume_from_checkpoint)
            if not (path / ckpt.COMPLETE).is_file():
                latest = ckpt.latest_checkpoint(path)  # a run directory was given
                if latest is None:
                    raise RecipeError(
                        f"resume_from_checkpoint={str(path)!r} is not a complete checkpoint (no {ckpt.COMPLETE} "
                        "marker) nor a run directory with one"
                    )
                path = latest
            v = self._on_main(lambda: ckpt.verify(path))
            if not v.ok:  # another run's checkpoint, named explicitly: reported, never renamed
                raise ckpt.CheckpointError(
                    f"resume_from_checkpoint {str(path)!r} is damaged: {'; '.join(v.problems)}. Point it at an intact "
                    "checkpoint (`gpt2-accel checkpoints RUN_DIR` lists them)"
                )
            return path
        latest = ckpt.latest_checkpoint(self.output_dir)
        resuming = m.init_from == "resume" or (
            t.resume_from_checkpoint == "auto" and not t.overwrite_output_dir
        )
        if latest is not None and resuming:
            latest = self._newest_intact()
        if m.init_from == "resume":
            if latest is None:
                raise RecipeError(
                    f"init_from='resume' but {str(self.output_dir)!r} has no complete checkpoint; "
                    "train with init_from=scratch first or point output_dir at an existing run"
                )
            return latest
        if latest is None or t.overwrite_output_dir:
            return None
        if t.resume_from_checkpoint == "auto":
            return latest
        raise RecipeError(
            f"output_dir {str(self.output_dir)!r} already holds checkpoints; use resume_from_checkpoint=auto to "
            "continue, overwrite_output_dir=true to start over there, or another output_dir"
        )

    def _newest_intact(self) -> Path:
        """The newest checkpoint that verifies; damaged ones are renamed aside with a warning (checkpoint.py)."""

        def find():
            path, skipped = ckpt.newest_intact_checkpoint(self.output_dir)
            if path is None:
                moved = ", ".join(str(p) for p, _ in skipped)
                raise ckpt.CheckpointError(
                    f"output_dir {str(self.output_dir)!r} has no intact checkpoint left: {moved} failed verification "
                    "(renamed, kept). Restore a checkpoint from a copy, or set overwrite_output_dir=true to start over"
                )
            return path

        return self._on_main(find)

    def _model_n_positions(self, resume_dir: Path | None) -> int:
        """The context length of the model the run will train, read without building (or downloading) it."""
        from .lora import adapter_base, is_adapter_dir

        m = self.recipe.model
        source = m.init_from
        if resume_dir is not None:
            if not is_adapter_dir(resume_dir / "model"):
                return int(ckpt.read_json(resume_dir / "model" / "config.json")["n_positions"])
            source = adapter_base(resume_dir / "model")  # a LoRA checkpoint: the base has the architecture
        elif m.init_from == "scratch":
            return m.n_positions
        local = Path(source) / "config.json"
        if local.is_file():
            config = ckpt.read_json(local)  # GPT-2's name, or the standard one (Llama / Qwen3 / NanoChat)
            return int(config.get("n_positions") or config["max_position_embeddings"])
        if source in OPENAI_GPT2:
            return 1024  # every OpenAI GPT-2 size has a 1024-token context
        from transformers import AutoConfig

        try:
            return int(AutoConfig.from_pretrained(source, trust_remote_code=True).n_positions)
        except OSError as e:
            raise RecipeError(
                f"init_from={m.init_from!r}: not 'scratch', 'resume', an OpenAI GPT-2 name, a local model directory, "
                f"or a reachable Hub repo ({e.__class__.__name__}: {e})"
            ) from None

    def _build_model(self, resume_dir: Path | None):
        from .configuration_gpt2_accel import GPT2AccelConfig
        from .modeling_gpt2_accel import GPT2AccelForCausalLM
        from .recipe import model_config

        m = self.recipe.model
        overrides = {k: v for k, v in (("dropout", m.dropout), ("attn_type", m.attn_type)) if v is not None}
        impl = m.attn_implementation
        from .lora import adapter_base, is_adapter_dir

        if resume_dir is not None and is_adapter_dir(resume_dir / "model"):
            # A LoRA checkpoint: build its base (the state loaded later restores base and adapter weights alike)
            drop = {"dropout": m.dropout} if m.dropout is not None else {}
            model = load_pretrained_for_training(
                adapter_base(resume_dir / "model"), attn_implementation=impl, **drop
            )
        elif resume_dir is not None:
            # The checkpoint's own export has the architecture; its weights are replaced by load_state anyway, so
            # build from the config alone: from_pretrained under ZeRO-3 would hand back partitioned (empty, 1-D)
            # parameters, which the optimizer's decay / no-decay split cannot classify.
            config = GPT2AccelConfig.from_pretrained(resume_dir / "model", **overrides)
            config._attn_implementation = impl
            model = GPT2AccelForCausalLM(config)
        elif m.init_from == "scratch":
            config = model_config(m, m.vocab_size or self.tokenizer.vocab_size, self.tokenizer.eot_token_id)
            model = GPT2AccelForCausalLM(config)
        else:
            model = load_pretrained_for_training(m.init_from, attn_implementation=impl, **overrides)
        model.config.use_cache = False  # training never needs the KV cache
        return model

    def _wrap_lora(self, resume_dir: Path | None):
        """The model with LoRA adapters; a fresh run whose base no file holds writes it first (see lora.py)."""
        from .lora import (
            BASE_MODEL_DIR,
            adapter_base,
            base_name,
            trainable_summary,
            wrap_model,
            write_base_model,
        )

        acc = self.accelerator
        if resume_dir is not None:
            base = adapter_base(resume_dir / "model")
        else:
            base = base_name(self.recipe.model)
            if base is None:
                if self.is_main:
                    write_base_model(self.model, self.tokenizer, self.output_dir)
                acc.wait_for_everyone()
                base = str((self.output_dir / BASE_MODEL_DIR).resolve())
        model = wrap_model(self.model, self.recipe.peft, base)
        logger.info("LoRA: %s; base %s", trainable_summary(model), base)
        return model

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        saved_recipe = ckpt.read_json(path / "recipe.json") if (path / "recipe.json").exists() else {}
        diffs = ckpt.recipe_differences(saved_recipe, self.recipe.flat())
        if diffs and not self.recipe.training.allow_recipe_change:
            raise RecipeError(
                f"cannot resume from {path}: the recipe differs from the checkpoint's in "
                + "; ".join(diffs)
                + ". Restore those keys, use another output_dir, or set allow_recipe_change=true"
            )
        # Resume never runs code from a checkpoint: every pickle it would load is checked first (checkpoint.py).
        ckpt.check_pickles(path / "state")
        unwrapped = acc.unwrap_model(self.model_engine)
        ckpt.check_state_shapes(
            path / "state", {k: tuple(v.shape) for k, v in unwrapped.state_dict().items()}
        )
        acc.load_state(str(path / "state"))
        self.state = run_files.read_trainer_state(path)
        # load_state restores Accelerate's micro-step counter, which decides where accumulation syncs; a run that
        # resumes with another gradient_accumulation_steps (e.g. 2 processes -> 1 process x 2 micro-batches) would
        # otherwise sync in the middle of a step. Checkpoints are written at step boundaries: realign to one.
        acc.step = self.state.step * self.recipe.training.gradient_accumulation_steps
        if self.ema is not None:
            from .ema import STATE_FILE, drop_snapshots_after

            if not (path / STATE_FILE).is_file():
                raise RecipeError(
                    f"cannot resume {path} with ema_sigma_rels: it was trained without EMAs (a power EMA starts at "
                    "step 1). Set ema_sigma_rels=null to resume it, or start a new output_dir"
                )
            self.ema.load(path / STATE_FILE)
            drop_snapshots_after(self.output_dir, self.state.step)
        data_state = ckpt.read_json(path / "data_state.json")
        self.train_loader.load_state_dict(data_state["ranks"])
        if self.is_main:
            run_files.truncate_metrics(self.output_dir, self.state.step)
        logger.info(
            "resumed from %s at step %d (%d tokens seen)", path, self.state.step, self.state.tokens_seen
        )

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step; atomic (see checkpoint.py). Collective: all ranks."""
        from accelerate.utils import gather_object

        step = self.state.step
        data_states = gather_object([self.train_loader.state_dict()])  # one entry per rank, in rank order
        tmp = Path(self.output_dir) / ckpt.CHECKPOINTS / f".tmp-{ckpt.checkpoint_name(step)}"
        try:
            return self._save_checkpoint(tmp, data_states)
        except (OSError, RuntimeError) as e:
            if not _disk_full(e, tmp.parent):
                raise
            if self.is_main:  # the partial save was never committed: give its space back
                shutil.rmtree(tmp, ignore_errors=True)
            previous = ckpt.latest_checkpoint(self.output_dir)
            raise ckpt.CheckpointError(
                f"the disk is full ({getattr(e, 'strerror', None) or e}) while saving the checkpoint of step {step} to {tmp.parent}; the "
                f"partial save was discarded and {previous or 'no earlier checkpoint'} is intact. Free space (or lower "
                "save_total_limit) and relaunch the same command to resume from it"
            ) from e

    def _save_checkpoint(self, tmp: Path, data_states: list[dict]) -> Path:
        acc, step = self.accelerator, self.state.step
        if self.is_main:
            ckpt.staging_dir(self.output_dir, step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        self._export_model(tmp / "model")
        if self.is_main:
            self.state.world_size = acc.num_processes
            self._record_wall_time()
            run_files.write_trainer_state(tmp, self.state)
            ckpt.write_json(tmp / "data_state.json", {"world_size": acc.num_processes, "ranks": data_states})
            ckpt.write_json(tmp / "recipe.json", self.recipe.flat())
            if self.ema is not None:
                from .ema import STATE_FILE

                self.ema.save(tmp / STATE_FILE, step)
            ckpt.atomic_write_text(tmp / "recipe.yaml", self.recipe.to_yaml())
        acc.wait_for_everyone()
        final = Path(self.output_dir) / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step)
        if self.is_main:
            final = ckpt.commit(tmp, step)
            keep = {self.state.best_step} if self.state.best_step is not None else set()
            ckpt.prune(self.output_dir, self.recipe.training.save_total_limit, keep)
            logger.info("checkpoint committed: %s", final)
            for cb in self.callbacks:
                cb.on_save(self, final)
            if self.recipe.training.push_to_hub and self.recipe.training.hub_strategy != "end":
                self._push(background=True, message=f"checkpoint at step {step}")
        acc.wait_for_everyone()
        return final

    def _export_model(self, directory: Path) -> None:
        """A consolidated Hugging Face model directory (collective: FSDP/ZeRO-3 gather the full weights)."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model_engine)
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            model = acc.unwrap_model(self.model_engine)
            model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
            if self.recipe.peft.use_peft:
                from .lora import save_adapter

                save_adapter(model, directory, state_dict)  # adapter_config.json + adapter_model.safetensors
                self.tokenizer.save_pretrained(directory)
                return
            _check_full_state_dict(state_dict, self.model)
            model.config.use_cache = True  # for the people who load it to generate
            with quiet_save():
                model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
            model.config.use_cache = False
            self.tokenizer.save_pretrained(directory, model_max_length=model.config.n_positions)

    # ------------------------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Validation loss/perplexity (and HellaSwag if configured) on all ranks; returns the reduced metrics."""
        self._setup()
        from .evaluation import evaluate_loss

        t = self.recipe.training
        out: dict[str, Any] = {"step": self.state.step}
        self.model_engine.eval()
        if self.has_eval:
            res = evaluate_loss(
                self.model_engine,
                self.eval_windows,
                batch_size=t.per_device_eval_batch_size,
                accelerator=self.accelerator,
            )
            out.update(val_loss=res["loss"], val_ppl=res["perplexity"], val_tokens=res["tokens"])
        if t.hellaswag_data:
            from .evaluation import load_hellaswag, score_hellaswag

            if not hasattr(self, "_hellaswag"):
                self._hellaswag = load_hellaswag(t.hellaswag_data, t.hellaswag_max_examples)
            hs = score_hellaswag(
                self.model_engine,
                self.tokenizer,
                self._hellaswag,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
                accelerator=self.accelerator,
            )
            out.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"], hellaswag_n=hs["n"])
        self.model_engine.train()
        if len(out) == 1:  # nothing to evaluate
            return out
        self.state.last_eval = out
        if "val_loss" in out and (
            self.state.best_val_loss is None or out["val_loss"] < self.state.best_val_loss
        ):
            self.state.best_val_loss, self.state.best_step = out["val_loss"], self.state.step
        if self.is_main:
            for cb in self.callbacks:
                cb.on_evaluate(self, out)
        self.accelerator.log({k: v for k, v in out.items() if k != "step"}, step=self.state.step)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self._setup()
        try:
            return self._train()
        except Exception as e:
            if self.accelerator.num_processes > 1 and _PEER_FAILURE.search(str(e)):
                logger.error(
                    "process %d: a collective failed (%s): another process died, or hung for longer than ddp_timeout="
                    "%ds. This run stops; relaunch the same command to resume from the last checkpoint",
                    self.accelerator.process_index, str(e).splitlines()[0][:200], self.recipe.training.ddp_timeout,
                )  # fmt: skip
            raise
        finally:
            self._close()  # completed, stopped by a signal, or raised: the data workers stop, the lock is released

    def _train(self) -> dict[str, Any]:
        """The loop: one optimizer step, then each component decides whether it acts at this step."""
        t, start_step = self.recipe.training, self.state.step
        self._begin_training()
        data_iter = iter(self.train_loader)
        bar = self._progress_bar()
        log = self._train_logger()
        validator = Periodic(t.eval_steps, self.evaluate)
        checkpointer = Periodic(t.save_steps, self.save_checkpoint)
        while self.state.step < self.max_steps:
            lr = set_lr(self.optimizer, self.state.step, t, self.max_steps)
            step_loss, grad_norm = self._train_step(data_iter)
            log.add(step_loss)
            bar.update(1)
            step = self.state.step
            if log.should_log(step):
                self._log(log, bar, lr, grad_norm)
            if validator.maybe(step):
                log.pause()
            if checkpointer.maybe(step):
                log.pause()
            if self._should_stop():
                bar.close()
                if not checkpointer.done_at(step):
                    checkpointer.run(step)
                logger.info("stopped by signal at step %d; checkpoint written, relaunch to resume", step)
                return {"step": step, "stopped": True}
        bar.close()
        # The signal handlers stay until train() returns: a SIGTERM during the final save lets it finish whole.
        return self._end_training(start_step, validator, checkpointer)

    def _begin_training(self) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(self)
        self._install_signal_handlers()
        self.model_engine.train()
        self._clock = (time.perf_counter(), self.state.wall_time_s)  # wall time so far, summed over resumes
        if self.state.step >= self.max_steps:
            logger.info(
                "already complete at step %d (max_steps=%d): nothing to do; raise max_steps to continue",
                self.state.step,
                self.max_steps,
            )

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.max_steps, initial=self.state.step, disable=not self.is_main, desc="train", unit="step"
        )

    def _train_logger(self) -> TrainLogger:
        t = self.recipe.training
        return TrainLogger(
            logging_steps=t.logging_steps,
            max_steps=self.max_steps,
            warmup_steps=t.warmup_steps,
            tokens_per_step=self.tokens_per_step,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
            num_processes=self.accelerator.num_processes,
            device=self.accelerator.device,
        )

    def _train_step(self, data_iter) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step: forward/backward over the gradient_accumulation_steps micro-batches, clip, the
        non-finite guard, the update. Returns the step's loss (a device tensor) and the gradient norm."""
        acc, t = self.accelerator, self.recipe.training
        model, ga, step = self.model_engine, t.gradient_accumulation_steps, self.state.step
        step_loss = torch.zeros((), device=acc.device)
        grad_norm = None
        for _ in range(ga):
            batch = next(data_iter).to(acc.device, non_blocking=True)  # (B, T + 1)
            with acc.accumulate(model):
                loss = self._loss(model, batch)
                acc.backward(loss)
                step_loss += loss.detach() / ga
                if acc.sync_gradients:
                    grad_norm = self._clip_grad_norm()
                    # One host sync per step: the guard must run before the update.
                    finite = torch.isfinite(step_loss) & (
                        torch.isfinite(grad_norm)
                        if isinstance(grad_norm, torch.Tensor)
                        else torch.tensor(True)
                    )
                    if bool(finite):
                        self._optimizer_step()
                    else:
                        self._nonfinite(step, step_loss, grad_norm, applied=self._deepspeed)
                        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        if self.ema is not None:
            self.ema.after_step(self.state.step, self.max_steps, self.output_dir, t.ema_snapshot_steps)
        return step_loss, grad_norm

    def _clip_grad_norm(self) -> torch.Tensor | None:
        """Clip to max_grad_norm (0: no clipping) and return the norm before clipping."""
        max_norm = self.recipe.training.max_grad_norm
        params = [p for p in self.model_engine.parameters() if p.requires_grad]
        grad_norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if grad_norm is not None and not isinstance(grad_norm, torch.Tensor):
            grad_norm = torch.tensor(float(grad_norm))  # DeepSpeed reports a float
        return grad_norm

    def _optimizer_step(self) -> None:
        """The update of one optimizer step (after clipping and the non-finite guard)."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, log: TrainLogger, bar, lr: float, grad_norm) -> None:
        """A training line: metrics.jsonl and every tracker (one accelerator.log call), the callbacks, the bar."""
        mean_loss = self.accelerator.reduce(log.local_mean(), reduction="mean").item()
        logs = log.line(self.state.step, mean_loss, lr, grad_norm, self.state.tokens_seen)
        if self.state.skipped_steps:
            logs["skipped_steps"] = self.state.skipped_steps
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{logs['tokens_per_sec']:,.0f}")
        if self.is_main:
            for cb in self.callbacks:
                cb.on_log(self, logs)
        self.accelerator.log({k: v for k, v in logs.items() if k != "step"}, step=self.state.step)

    def _end_training(self, start_step: int, validator: Periodic, checkpointer: Periodic) -> dict[str, Any]:
        """The final evaluation, checkpoint and export, unless this run trained nothing and the export exists."""
        step = self.state.step
        final: dict[str, Any] = {"step": step}
        exported = any(
            (self.output_dir / f).exists() for f in ("model.safetensors", "adapter_model.safetensors")
        )
        if step > start_step or not exported:
            final.update((self.state.last_eval or {}) if validator.done_at(step) else validator.run(step))
            if not checkpointer.done_at(step):
                checkpointer.run(step)
            self._finish(final)
        if self.is_main:
            for cb in self.callbacks:
                cb.on_train_end(self, final)
        self.accelerator.end_training()
        return final

    def _loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch (B, T + 1): the CE, or the distillation mix (distill.py)."""
        inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, T) each
        out = model(input_ids=inputs, shift_labels=targets, use_cache=False, skip_logits=self.skip_logits)
        if self.teacher is None:
            return out.loss
        from .distill import distillation_loss, teacher_logits

        kd = self.recipe.distillation
        t_logits = teacher_logits(self.teacher, inputs, self.accelerator.autocast)
        loss, _, _ = distillation_loss(
            out.logits, t_logits, targets, temperature=kd.temperature, alpha=kd.distillation_alpha
        )
        return loss

    def _nonfinite(self, step: int, loss: torch.Tensor, grad_norm, applied: bool = False) -> None:
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        msg = f"non-finite loss or gradient at step {step + 1}: loss={float(loss):.4g}, grad_norm={gn:.4g}"
        # DeepSpeed already stepped inside backward: the weights are poisoned, skipping cannot help
        if applied:
            raise NonFiniteLossError(
                msg
                + ". Under DeepSpeed the update was already applied; resume from the last checkpoint with a "
                "lower learning_rate or check the data"
            )
        if self.recipe.training.on_nonfinite == "error":
            raise NonFiniteLossError(
                msg + ". Lower learning_rate, check the data, or set on_nonfinite=skip to skip such steps"
            )
        self.state.skipped_steps += 1
        logger.warning("%s: update skipped (%d skipped so far)", msg, self.state.skipped_steps)

    def _finish(self, final: dict[str, Any]) -> None:
        """Final model export at the run's root, the loss curve, run info; push if asked. Collective."""
        acc, t = self.accelerator, self.recipe.training
        self._export_model(self.output_dir)
        checksums = self._replica_checksums()
        if self.is_main:
            plot_loss_curve(
                self.output_dir / run_files.METRICS, self.output_dir / "loss_curve.png", self.output_dir.name
            )
            run_files.write_eval_results(self.output_dir, run_files.eval_results_of(final))
            self._record_wall_time()
            run_files.write_run_info(
                self.output_dir,
                run_files.RunInfo(
                    steps=self.state.step,
                    tokens_seen=self.state.tokens_seen,
                    wall_time_s=self.state.wall_time_s,
                    hardware=run_files.hardware_name(acc.device),
                    device_type=acc.device.type,
                    world_size=acc.num_processes,
                    distributed_type=str(acc.distributed_type),
                    mixed_precision=acc.mixed_precision,
                    skipped_steps=self.state.skipped_steps,
                    replica_checksums=checksums,
                    license=t.license,
                ),
            )
            if t.push_to_hub:
                self._push(background=False, message=f"final model after {self.state.step} steps")
        acc.wait_for_everyone()

    def _record_wall_time(self) -> None:
        """Bring ``state.wall_time_s`` up to now: the time of this train() call plus that of earlier ones."""
        clock = getattr(self, "_clock", None)
        if clock is not None:
            self.state.wall_time_s = clock[1] + time.perf_counter() - clock[0]

    def _replica_checksums(self) -> list[float] | None:
        """Every rank's float64 sum of its model weights (DDP: must be equal, i.e. the replicas stayed in sync).
        None under ZeRO-3 / FSDP, where each rank holds different shards. Collective."""
        from accelerate.utils import DistributedType, gather_object

        acc = self.accelerator
        sharded = acc.distributed_type == DistributedType.FSDP or (
            self._deepspeed and acc.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded:
            return None
        with torch.no_grad():
            total = sum(p.detach().double().sum().item() for p in self.model.parameters())
        return gather_object([total]) if acc.num_processes > 1 else [total]

    def _push(self, *, background: bool, message: str) -> None:
        """Push the run to the Hub (main process). A failure is logged, never raised: training is never lost to it.

        Pushes are jobs of huggingface_hub's background queue (``HfApi.run_as_future``: one worker, jobs run in the
        order they were submitted), so checkpoint pushes do not hold up the next steps; the final push waits for its
        own job, hence for every earlier one, so the repo ends with the final model.
        """
        from huggingface_hub import HfApi

        t = self.recipe.training

        def push() -> None:
            from .hub import push_run

            try:
                repo_id = t.hub_model_id or _default_repo_id(self.output_dir, t.hub_token)
                url = push_run(
                    self.output_dir,
                    repo_id,
                    token=t.hub_token,
                    private=t.hub_private_repo,
                    include_checkpoints=t.hub_strategy == "checkpoint",
                    commit_message=message,
                )
                logger.info("pushed to %s (%s)", url, message)
            except Exception as e:  # HubPushError, network, auth: whatever it is, the run goes on
                logger.error("push to the Hub failed; the run is intact in %s. Retry with `gpt2-accel push %s "
                             "--repo-id ...`: %s", self.output_dir, self.output_dir, e)  # fmt: skip

        if getattr(self, "_hub_queue", None) is None:
            self._hub_queue = HfApi(token=t.hub_token)
        job = self._hub_queue.run_as_future(push)
        if not background:
            job.result()

    # ------------------------------------------------------------------------------------------------------------
    # preemption
    # ------------------------------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}

        def handler(signum, frame):
            self._stop_signal = signum  # finish the step, checkpoint, exit 0 (see _should_stop)

        with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker): no handlers
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        handlers, self._old_handlers = getattr(self, "_old_handlers", {}), {}
        for sig, old in handlers.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)

    def _should_stop(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_signal is not None else 0.0, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")  # any rank signalled -> every rank stops
        return bool(flag.item() > 0)


def load_pretrained_for_training(source: str, attn_implementation: str = "sdpa", **overrides):
    """Our model from ``source``: an OpenAI GPT-2 name, a GPT-2 / Llama / Qwen3 / NanoChat transformers directory,
    or one of ours (run dir/repo)."""
    from transformers import AutoConfig

    from .modeling_gpt2_accel import GPT2AccelForCausalLM

    if source in OPENAI_GPT2:
        from .convert import from_hf_gpt2

        return from_hf_gpt2(source, attn_implementation=attn_implementation, **overrides)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    except OSError as e:
        raise RecipeError(
            f"init_from={source!r}: not 'scratch', 'resume', an OpenAI GPT-2 name, a local model directory, or a "
            f"reachable Hub repo ({e.__class__.__name__}: {e})"
        ) from None
    if config.model_type in (
        "gpt2",
        "llama",
        "qwen3",
        "nanochat",
    ):  # standard classes convert.from_hf imports
        from .convert import from_hf

        return from_hf(source, attn_implementation=attn_implementation, **overrides)
    return GPT2AccelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation, **overrides)


def _check_full_state_dict(state_dict: dict[str, torch.Tensor], model) -> None:
    """Refuse to export a partial state dict (a ZeRO-3 / FSDP shard instead of the gathered weights)."""
    from .parallel import expected_shapes

    shapes = expected_shapes(model.config)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    )
    missing = sorted(k for k in shapes if k not in state_dict and k not in tied)
    wrong = sorted(k for k, v in state_dict.items() if k in shapes and tuple(v.shape) != shapes[k])
    if missing or wrong:
        raise RuntimeError(
            f"the model export is incomplete: missing {missing[:5]}, wrong shapes (sharded?) {wrong[:5]}. Under "
            "ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true (accelerate_configs/deepspeed_zero3.yaml); "
            "under FSDP use fsdp_state_dict_type SHARDED_STATE_DICT with Accelerate's get_state_dict"
        )


def _disk_full(e: BaseException, directory: Path) -> bool:
    """ENOSPC / EDQUOT, or a write error on a filesystem with no space left. torch.save reports a full disk as a
    RuntimeError ("iostream error", "unexpected pos"), without an errno: checked on a full tmpfs (test_reliability)."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 16 * 2**20


def _default_repo_id(output_dir: Path, token: str | None) -> str:
    """``<your user name>/<output_dir name>``, as transformers' Trainer does when hub_model_id is not set."""
    from huggingface_hub import HfApi

    return f"{HfApi(token=token).whoami()['name']}/{Path(output_dir).name}"
