"""FSDP2 helpers for the tests: torch's ``fully_shard`` with the wrap policy of accelerate_configs/fsdp.yaml.

Accelerate's FSDP plugin does this on GPUs; the tests run the same code paths on CPU over gloo (2 ranks): our wrap
policy (one unit per ``GPT2AccelBlock`` + the root, which owns the tied ``wte``/``lm_head``), sharded checkpoints
through ``torch.distributed.checkpoint`` (DCP: resharded on load, so a checkpoint of N ranks loads on M), and the
consolidated full state dict a Hugging Face export needs. Only tests use them (test_distributed.py, test_muon_fsdp2.py;
issue 14: the library keeps what it runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2_accel.checkpoint import check_pickles


def apply_fsdp(
    model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None
) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one ``fully_shard`` unit per ``GPT2AccelBlock``, then the root.

    The per-block units are accelerate_configs/fsdp.yaml's TRANSFORMER_BASED_WRAP on GPT2AccelBlock: a block's
    parameters are gathered just before its forward and freed after, so peak memory holds one block at a time.
    The root unit keeps ``wte``, ``wpe``, ``ln_f`` and ``lm_head``; the tied ``lm_head``/``wte`` weight must stay in
    ONE unit (wrapping the embedding alone would shard the same Parameter twice).
    """
    from torch.distributed.fsdp import fully_shard

    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def save_sharded(directory: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Each rank writes its own shards of the model (and optimizer) with DCP. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer or [])
    state = {"model": msd} if optimizer is None else {"model": msd, "optimizer": osd}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``) in place, resharding to this world. Collective.

    The checkpoint may come from any number of ranks: DCP stores global shapes and offsets, and each rank reads
    the pieces of its own shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_pickles(directory)  # DCP unpickles .metadata with plain pickle: refuse one that imports code
    msd, osd = get_state_dict(model, optimizer or [])
    state = {"model": msd} if optimizer is None else {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer or [], model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {})
    )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated, unsharded model state on CPU (rank 0 gets it; other ranks get {}). Collective.

    The tied ``lm_head.weight`` comes back as the same values as ``transformer.wte.weight``; ``save_pretrained``
    drops the duplicate and ``from_pretrained`` re-ties it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate_checkpoint(directory: str | os.PathLike, key: str = "model") -> dict[str, torch.Tensor]:
    """Read a DCP checkpoint's full ``key`` state in ONE process, no process group (e.g. to export it offline)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_pickles(directory)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(directory), str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
    return state.get(key, state)


def export_full_model(
    model_config, state_dict: dict[str, torch.Tensor], directory: str | os.PathLike
) -> None:
    """Write a consolidated state dict as a single-process-loadable Hugging Face model directory (safetensors)."""
    from gpt2_accel.modeling_gpt2_accel import GPT2AccelForCausalLM

    with torch.device("meta"):
        model = GPT2AccelForCausalLM(model_config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the state dict lacks {missing}; it is not a complete GPT2AccelForCausalLM")
    model.save_pretrained(directory, safe_serialization=True)
