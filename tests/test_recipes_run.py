"""Every shipped training recipe runs here with tiny overrides: a broken recipe never ships.

Hub-only sources are swapped for what exists offline: Hub datasets for the bundled Shakespeare, OpenAI GPT-2
weights for a tiny randomly initialised transformers GPT2LMHeadModel saved to disk (so the conversion path runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2_accel.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TRAINING_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if not p.name.startswith("eval_"))
TINY = {
    "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32, "block_size": 32, "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 2, "max_eval_samples": 4,
    "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "dataloader_num_workers": 0, "bf16": False,
    "torch_compile": False, "warmup_steps": 1, "max_train_tokens": None,
}  # fmt: skip
HELLASWAG_FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag_tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_openai_gpt2(tmp_path_factory) -> Path:
    """A stand-in for OpenAI's `gpt2` on disk: transformers' GPT2LMHeadModel, tiny, random, GPT-2 vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2-tiny")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", TRAINING_RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in TRAINING_RECIPES]
)
def test_recipe_trains_two_steps_with_tiny_overrides(path, tmp_path, tiny_openai_gpt2):
    from gpt2_accel.trainer import Trainer

    recipe = load_recipe(path)
    overrides = dict(TINY, output_dir=str(tmp_path / "run"))
    if recipe.model.init_from != "scratch":
        overrides["init_from"] = str(tiny_openai_gpt2)
    if recipe.distillation.teacher_model_name_or_path:  # a tiny local teacher in the recipe's place
        overrides["teacher_model_name_or_path"] = str(tiny_openai_gpt2)
    if not str(recipe.data.dataset_name).startswith("bundled:"):
        overrides.update(dataset_name="bundled:shakespeare", dataset_config_name=None)
    if recipe.training.hellaswag_data:
        overrides["hellaswag_data"] = str(HELLASWAG_FIXTURE)
    if recipe.model.n_kv_head:
        overrides["n_kv_head"] = 1  # TINY has 2 query heads
    if recipe.model.layer_types:
        overrides["n_layer"] = len(recipe.model.layer_types)  # one repeat of the layer pattern
    if recipe.model.sliding_window:
        overrides["sliding_window"] = 8  # shorter than the 32-token windows, so the band is exercised
    final = Trainer.from_recipe_file(path, overrides).train()
    assert final["step"] == 2 and final["val_loss"] > 0
    from gpt2_accel import GPT2AccelForCausalLM

    model_dir = tmp_path / "run"
    if recipe.peft.use_peft:  # the run holds the adapter; its base (with the new attention) is named in it
        from gpt2_accel.lora import adapter_base

        assert (model_dir / "adapter_model.safetensors").is_file()
        model_dir = Path(adapter_base(model_dir))
    assert (model_dir / "model.safetensors").is_file()
    model = GPT2AccelForCausalLM.from_pretrained(model_dir)
    assert model.config.attn_type == (recipe.model.attn_type or "SM")
    for key in ("position_embedding_type", "norm_type", "mlp_type", "qk_norm", "attention_sinks"):
        assert getattr(model.config, key) == getattr(recipe.model, key), key
