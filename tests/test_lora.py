"""LoRA through PEFT: default targets, a run's adapter files, bitwise resume, the round trip through a fresh process
(PeftModel.from_pretrained), merging and exporting, pushing, DDP / ZeRO-2, and the errors before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from gpt2_accel.recipe import RecipeError, load_recipe

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, n_positions=32, block_size=32, per_device_train_batch_size=2,
    per_device_eval_batch_size=4, max_eval_samples=4, dataloader_num_workers=0, warmup_steps=1, logging_steps=1,
    eval_steps=0, save_steps=2, max_steps=4, report_to=["none"], learning_rate=1e-2,
)  # fmt: skip
IDS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])  # (1, 10) GPT-2 BPE ids


def _trainer(**keys):
    from gpt2_accel.trainer import Trainer

    return Trainer(**{**TINY, **keys})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A trained tiny softmax model (our run directory), the base every adapter here adapts."""
    out = tmp_path_factory.mktemp("base") / "run"
    _trainer(output_dir=str(out), max_steps=2, learning_rate=6e-4).train()
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return env


def test_peft_finds_our_default_target_modules_without_being_told():
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gpt2_accel"] == ["c_attn", "c_proj", "c_fc"]
    model = get_peft_model(tiny_model(), LoraConfig(r=4, task_type="CAUSAL_LM"))  # no target_modules
    adapted = {n.rsplit(".", 3)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    # every Linear layer of both blocks: 2 x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    assert len(adapted) == 8 and all(n.endswith(("c_attn", "c_proj", "c_fc")) for n in adapted)


@pytest.mark.slow  # a fresh interpreter importing torch + peft
def test_peft_registration_happens_when_peft_is_imported_after_gpt2_accel():
    code = "import gpt2_accel, sys; assert 'peft' not in sys.modules\n"
    code += "from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M; print(M['gpt2_accel'])"
    out = subprocess.run([sys.executable, "-c", code], env={**_env(), "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['c_attn', 'c_proj', 'c_fc']" in out.stdout


_RELOAD = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({base!r}, trust_remote_code=True)  # without our package
model = PeftModel.from_pretrained(base, {adapter!r}).eval()
assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
with torch.no_grad():
    torch.save(model(torch.tensor({ids})).logits, {out!r})
"""


@pytest.mark.slow
def test_lora_run_resumes_bitwise_reloads_in_a_fresh_process_merges_and_exports(base, tmp_path):
    keys = dict(init_from=str(base), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    ref = _trainer(output_dir=str(tmp_path / "ref"), **keys)
    ref.train()
    run = tmp_path / "run"

    class StopAt2:  # the same as a SIGTERM at step 2: checkpoint, return
        def on_log(self, trainer, logs):
            if logs["step"] == 2:
                trainer._stop_signal = 15

        def __getattr__(self, name):
            return lambda *a, **k: None

    t = _trainer(output_dir=str(run), callbacks=[StopAt2()], **keys)
    assert t.train()["stopped"]
    _trainer(output_dir=str(run), **keys).train()  # resumes at step 2

    assert _losses(run) == _losses(
        tmp_path / "ref"
    )  # every step bitwise (lora_dropout draws from the RNG too)
    from safetensors.torch import load_file

    a, b = (
        load_file(run / "adapter_model.safetensors"),
        load_file(tmp_path / "ref" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("lora_" in k for k in a) and len(a) == 16  # 8 adapted Linear layers x (A, B); no base weights
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert (
        cfg["base_model_name_or_path"] == str(base.resolve()) and cfg["peft_type"] == "LORA" and cfg["r"] == 4
    )
    assert not (run / "model.safetensors").exists() and not (run / "README.md").exists()
    assert (run / "checkpoints" / "step_00000004" / "model" / "adapter_model.safetensors").is_file()

    # the trained model's logits == PeftModel.from_pretrained(base, run) in a fresh process without our package
    model = ref.model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    out = tmp_path / "logits.pt"
    script = _RELOAD.format(base=str(base), adapter=str(run), ids=IDS.tolist(), out=str(out))
    proc = subprocess.run([sys.executable, "-I", "-c", script], env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(out, weights_only=True), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, _base_logits(base), atol=1e-3)  # the adapter changed the model

    # merge: a plain model directory with the same logits, which exports to transformers' GPT-2
    from gpt2_accel.cli import main as cli

    merged = tmp_path / "merged"
    assert cli(["merge", str(run), "--output", str(merged)]) == 0
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    from gpt2_accel import GPT2AccelForCausalLM

    m = GPT2AccelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, expected, rtol=1e-4, atol=1e-5)
    assert cli(["convert", "--to-hf", str(merged), "--output", str(tmp_path / "hf")]) == 0
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, expected, rtol=1e-4, atol=1e-5)


def _base_logits(base: Path) -> torch.Tensor:
    from gpt2_accel import GPT2AccelForCausalLM

    with torch.no_grad():
        return GPT2AccelForCausalLM.from_pretrained(base).eval()(IDS).logits


def test_merge_refuses_an_existing_output_and_a_directory_without_adapter(base, tmp_path):
    from gpt2_accel.cli.merge import main

    with pytest.raises(SystemExit) as e:
        main([str(base), "--output", str(tmp_path / "m")])  # a full model, not an adapter
    assert e.value.code == 2 and not (tmp_path / "m").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([str(base), "--output", str(tmp_path / "busy")])
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_converting_attention_with_lora_writes_the_base_it_adapts(base, tmp_path):
    """attn_type GK on an SM base: the adapter's base must be the GK model, which no file held before the run."""
    run = tmp_path / "gk"
    _trainer(output_dir=str(run), init_from=str(base), attn_type="GK", use_peft=True, max_steps=2).train()
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((run / "base_model").resolve())
    assert json.loads((run / "base_model" / "config.json").read_text())["attn_type"] == "GK"
    merged = tmp_path / "merged"
    from gpt2_accel.cli.merge import main

    assert main([str(run), "--output", str(merged)]) == 0
    assert json.loads((merged / "config.json").read_text())["attn_type"] == "GK"


# ---------------------------------------------------------------------------------------------------------------
# errors before training
# ---------------------------------------------------------------------------------------------------------------
def test_lora_r_must_be_positive():
    with pytest.raises(RecipeError, match=r"lora_r must be >= 1"):
        load_recipe(None, {"use_peft": True, "lora_r": 0})


def test_target_modules_that_match_nothing_list_the_linear_layers(base, tmp_path):
    t = _trainer(
        output_dir=str(tmp_path / "r"), init_from=str(base), use_peft=True, lora_target_modules=["q_proj"]
    )
    with pytest.raises(
        RecipeError, match=r"\['q_proj'\] match no Linear layer.*\['c_attn', 'c_fc', 'c_proj'\]"
    ):
        t.setup()
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resuming_across_use_peft_is_refused_both_ways(base, tmp_path):
    full, lora = tmp_path / "full", tmp_path / "lora"
    _trainer(output_dir=str(full), init_from=str(base), max_steps=2).train()
    _trainer(output_dir=str(lora), init_from=str(base), use_peft=True, max_steps=2).train()
    with pytest.raises(RecipeError, match=r"full-finetuning run but the recipe has use_peft=true"):
        _trainer(output_dir=str(full), init_from=str(base), use_peft=True, max_steps=3).setup()
    with pytest.raises(
        RecipeError, match=r"LoRA run .* but the recipe has use_peft=false; set use_peft=true"
    ):
        _trainer(output_dir=str(lora), init_from=str(base), max_steps=3).setup()


def test_sharded_launches_are_refused_clearly():
    from accelerate.utils import DistributedType

    from gpt2_accel.lora import check_launch

    check_launch(DistributedType.MULTI_CPU, None)
    check_launch(DistributedType.DEEPSPEED, 2)
    with pytest.raises(RecipeError, match=r"ZeRO-3 .* use ZeRO-1/2"):
        check_launch(DistributedType.DEEPSPEED, 3)
    with pytest.raises(RecipeError, match=r"FSDP.*DDP"):
        check_launch(DistributedType.FSDP, None)


# ---------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------
def test_push_uploads_the_adapter_with_a_card_naming_the_base(base, tmp_path, monkeypatch):
    import huggingface_hub.constants

    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import HubTestServer

    from gpt2_accel.hub import push_run

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the test server speaks LFS
    run = tmp_path / "lora-run"
    _trainer(output_dir=str(run), init_from=str(base), use_peft=True, max_steps=2).train()
    with HubTestServer() as hub:
        push_run(run, "tester/lora", token=hub.token, endpoint=hub.url)
        files = hub.files("tester/lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert "model.safetensors" not in files
    card = files["README.md"].decode()
    assert (
        "library_name: peft" in card and str(base.resolve()) in card and "PeftModel.from_pretrained" in card
    )
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == str(base.resolve())


# ---------------------------------------------------------------------------------------------------------------
# several processes
# ---------------------------------------------------------------------------------------------------------------
def _test_distributed():
    sys.path.insert(0, str(Path(__file__).parent))
    import test_distributed as td

    return td


@pytest.fixture(scope="module")
def lora_one_process(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """A LoRA run on one process with gradient accumulation 2 (the reference of the 2-process runs): its data, its
    LoRA keys and its run directory."""
    td = _test_distributed()
    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
    from gpt2_accel.tokenization import get_tokenizer

    tmp_path = tmp_path_factory.mktemp("lora2")
    data = tmp_path / "train.bin"
    import numpy as np

    ids = np.frombuffer(
        (ROOT / "gpt2_accel/assets/data/shakespeare.txt").read_bytes()[:100_000], dtype=np.uint8
    )
    ids.astype(np.uint16)[:90_000].tofile(data)
    ids.astype(np.uint16)[90_000:].tofile(tmp_path / "val.bin")
    tok = get_tokenizer("char")
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2AccelForCausalLM(
        GPT2AccelConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(base)
    lora = [f"--init_from={base}", "--use_peft=true", "--lora_r=4", "--lora_dropout=0.0", "--max_steps=5",
            "--learning_rate=1e-2"]  # fmt: skip
    one = tmp_path / "one"
    td._run(td._launch("cpu.yaml", 1, data, one, *lora, "--gradient_accumulation_steps=2"))
    return data, lora, one


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu.yaml", "deepspeed_zero2.yaml"])
@pytest.mark.usefixtures("deepspeed_ops")
def test_lora_with_two_processes_trains_like_one(config, lora_one_process, tmp_path):
    if "deepspeed" in config:
        pytest.importorskip("deepspeed")
    td = _test_distributed()
    data, lora, one = lora_one_process
    two = tmp_path / "two"
    proc = td._run(td._launch(config, 2, data, two, *lora))
    assert "processes=2" in proc.stdout + proc.stderr
    td._assert_same_losses(td._losses(two), td._losses(one))
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
