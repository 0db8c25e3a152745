"""Shared fixtures: tiny GPT-2 configurations and models that build in milliseconds on a CPU.

Import the helpers directly (``from conftest import tiny_config, tiny_model``) or use the fixtures.
"""

from __future__ import annotations

import pytest
import torch

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM


def tiny_config(**overrides) -> GPT2AccelConfig:
    """A 2-layer, 64-wide, 4-head GPT-2 with a 128-token vocabulary and a 64-token context."""
    kwargs = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    kwargs.update(overrides)
    return GPT2AccelConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> GPT2AccelForCausalLM:
    """A freshly initialised tiny model in eval mode (fp32, CPU), reproducible from ``seed``."""
    torch.manual_seed(seed)
    return GPT2AccelForCausalLM(tiny_config(**overrides)).eval()


def tiny_hf_gpt2(seed: int = 0, **overrides):
    """transformers' own GPT2LMHeadModel with the tiny shape, random weights (the parity reference)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kwargs = dict(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=127, eos_token_id=127
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kwargs)).eval()


@pytest.fixture
def config() -> GPT2AccelConfig:
    return tiny_config()


@pytest.fixture
def model() -> GPT2AccelForCausalLM:
    return tiny_model()
