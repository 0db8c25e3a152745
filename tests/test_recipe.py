"""The recipe schema: YAML + overrides -> typed, validated Recipe; every shipped recipe and launch config loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gpt2_accel.recipe import SECTIONS, RecipeError, field_docs, help_text, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
LAUNCH_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


def test_demo_recipe_exists_and_loads():
    r = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert r.model.init_from == "scratch"
    assert r.data.dataset_name == "bundled:shakespeare"
    assert r.training.output_dir == "runs/demo"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    load_recipe(path)  # unknown keys, bad types and bad relations all raise RecipeError


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=[p.name for p in LAUNCH_CONFIGS])
def test_every_launch_config_is_a_valid_accelerate_config(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # accelerate's own parser: unknown/typo'd fields fail here
    raw = yaml.safe_load(path.read_text())
    assert "num_processes" in raw and "distributed_type" in raw
    # the mode the file is named for (cpu.yaml: MULTI_GPU is how Accelerate starts N CPU processes, see its header)
    expected = {"cpu": "MULTI_GPU", "ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}[
        path.stem.split("_")[0]
    ]
    assert str(cfg.distributed_type).split(".")[-1] == expected
    if expected == "DEEPSPEED":  # deepspeed_zero<N>[_offload].yaml
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem.split("_")[1].removeprefix("zero"))
    assert cfg.num_machines == (2 if "multinode" in path.stem else 1)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_builds_its_model_config_and_optimizer(path):
    """What the trainer builds from a recipe, built here: the model config (from scratch, or the keys applied to a
    pretrained one) and the optimizer with the recipe's schedule, on a tiny model of the recipe's architecture."""
    import torch

    from gpt2_accel.optim import build_optimizer, set_lr
    from gpt2_accel.recipe import model_config

    r = load_recipe(path)
    m, t = r.model, r.training
    config = model_config(m, m.vocab_size or 50257, 50256)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (
        m.n_layer, m.n_head, m.n_embd, m.n_positions
    )  # fmt: skip
    assert (
        config.attn_type == (m.attn_type or "SM")
        and config.position_embedding_type == m.position_embedding_type
    )
    assert config.vocab_size >= (m.vocab_size or 50257) and config.eos_token_id == 50256

    from gpt2_accel import GPT2AccelForCausalLM

    shrink = dict(
        n_layer=len(config.layer_types or [0, 0]), n_embd=64, n_head=4, n_positions=32, vocab_size=128
    )
    shrink.update(
        n_kv_head=2 if m.n_kv_head else None, n_inner=None, sliding_window=8 if m.sliding_window else None
    )
    tiny = GPT2AccelForCausalLM(type(config)(**{**config.to_dict(), **shrink}))
    opt = build_optimizer(tiny, t, "cpu")
    lr = set_lr(opt, 0, t, t.max_steps)
    assert lr == pytest.approx(t.learning_rate / t.warmup_steps if t.warmup_steps else t.learning_rate)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in tiny.parameters() if p.requires_grad)  # every weight is trained
    assert torch.isfinite(
        tiny(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)).loss
    )


def test_overrides_both_spellings_and_types():
    r = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        [
            "--max_steps=7",
            "--learning_rate",
            "3e-4",
            "--report_to=tensorboard,wandb",
            "--torch_compile",
            "--n_layer",
            "2",
        ],
    )
    assert r.training.max_steps == 7 and isinstance(r.training.max_steps, int)
    assert r.training.learning_rate == pytest.approx(3e-4)
    assert r.training.report_to == ["tensorboard", "wandb"]
    assert r.training.torch_compile is True
    assert r.model.n_layer == 2


def test_nested_and_dotted_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  n_layer: 3\ntraining:\n  max_steps: 5\n")
    r = load_recipe(p, ["--data.text_column=content"])
    assert (r.model.n_layer, r.training.max_steps, r.data.text_column) == (3, 5, "content")


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'learning_rat'.*'learning_rate'"):
        load_recipe(None, ["--learning_rat=1e-3"])
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  n_layr: 3\n")
    with pytest.raises(RecipeError, match=r"'model.n_layr'.*'n_layer'"):
        load_recipe(p)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--n_embd=65", "--n_head=2"], r"n_embd=65 must be divisible by n_head=2"),
        (["--max_steps=abc"], r"'max_steps' must be an integer"),
        (["--per_device_train_batch_size=0"], r"per_device_train_batch_size must be >= 1"),
        (["--min_lr=1", "--learning_rate=1e-3"], r"min_lr=1.0 must be in \[0, learning_rate"),
        (["--block_size=2048", "--n_positions=1024"], r"block_size=2048 is longer than the model's context"),
        (["--bf16", "--fp16"], r"bf16 and fp16 are both true"),
        (["--lr_scheduler_type=exp"], r"lr_scheduler_type must be one of"),
        (["--attn_type=XX"], r"attn_type='XX' is not a valid attention type; valid forms: SM, GK"),
        (["--report_to=tensorbored"], r"report_to has unknown tracker"),
        (
            ["--dataset_name=[a, b]", "--dataset_weights=[1.0]"],
            r"dataset_weights has 1 entries but dataset_name has 2",
        ),
        (
            ["--resume_from_checkpoint=/no/such/ckpt"],
            r"resume_from_checkpoint='/no/such/ckpt' does not exist",
        ),
        (["--torch_compile=maybe"], r"'torch_compile' must be true or false"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, overrides)


def test_missing_or_malformed_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file .* not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("max_steps: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_every_field_is_documented_and_keys_are_unique():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names)), "a key may belong to one section only (recipes are flat)"
    docs = field_docs()
    assert all(docs[n].strip() for n in names)
    text = help_text()
    assert "--learning_rate" in text and "Peak learning rate" in text


def test_trainingarguments_names_are_used_where_they_exist():
    from transformers import TrainingArguments

    hf = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in (
        "output_dir",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "warmup_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "seed",
        "save_total_limit",
        "report_to",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "lr_scheduler_type",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "bf16",
        "fp16",
        "torch_compile",
        "gradient_checkpointing",
        "resume_from_checkpoint",
        "run_name",
        "dataloader_num_workers",
    ):
        assert key in hf, key
        assert key in field_docs(), key


def test_resolved_recipe_round_trips_and_hides_the_token(tmp_path):
    r = load_recipe(ROOT / "recipes" / "demo.yaml", ["--hub_token=hf_secret123", "--max_steps=9"])
    text = r.to_yaml()
    assert "hf_secret123" not in text
    p = tmp_path / "resolved.yaml"
    p.write_text(text)
    r2 = load_recipe(p)
    assert r2.training.max_steps == 9 and r2.flat()["n_layer"] == r.flat()["n_layer"]
