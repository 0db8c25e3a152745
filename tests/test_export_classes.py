"""Exact export of every exportable architecture to its standard transformers class, checked where gpt2_accel is
not importable; configs no class computes are refused; the same classes import back (--from-hf) and finetune."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import ids, jitter, run_without_package, tiny_model

from gpt2_accel.cli.convert import main
from gpt2_accel.convert import export_class, from_hf, to_hf

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False}
ROTARY = dict(position_embedding_type="rope", norm_type="rmsnorm", bias=False)

# name -> (our options, the class that must come out)
EXPORTS = {
    "gpt2_untied_no_bias": (dict(tie_word_embeddings=False, bias=False), "GPT2LMHeadModel"),
    "llama_gqa_yarn_untied": (
        dict(ROTARY, mlp_type="swiglu", n_kv_head=2, rope_scaling=YARN, tie_word_embeddings=False),
        "LlamaForCausalLM",
    ),
    "llama_biases": (dict(ROTARY, mlp_type="swiglu", attention_bias=True, mlp_bias=True), "LlamaForCausalLM"),
    "qwen3_mqa_sliding": (
        dict(
            ROTARY,
            mlp_type="swiglu",
            n_kv_head=1,
            qk_norm=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "Qwen3ForCausalLM",
    ),
    "nanochat_softcap": (
        dict(
            ROTARY,
            norm_elementwise_affine=False,
            norm_after_embedding=True,
            mlp_type="relu2",
            qk_norm=True,
            n_kv_head=2,
            tie_word_embeddings=False,
            final_logit_softcapping=15.0,
        ),
        "NanoChatForCausalLM",
    ),
}


def test_each_export_computes_our_logits_in_a_process_without_our_package(tmp_path, capsys):
    x = ids(t=20)  # past the sliding window of 4
    cases = {}
    for name, (options, cls) in EXPORTS.items():
        ours = jitter(tiny_model(**options), scale=0.1)
        ours.save_pretrained(tmp_path / name / "ours")
        assert main(["--to-hf", str(tmp_path / name / "ours"), "--output", str(tmp_path / name / "hf")]) == 0
        assert f"wrote {cls}" in capsys.readouterr().out
        config = json.loads((tmp_path / name / "hf" / "config.json").read_text())
        assert "auto_map" not in config and not list((tmp_path / name / "hf").glob("*.py"))
        with torch.no_grad():
            torch.save(ours(x).logits, tmp_path / name / "expected.pt")
        greedy = ours.generate(
            x[:1, :5], max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        torch.save(greedy, tmp_path / name / "greedy.pt")
        cases[name] = cls
    torch.save(x, tmp_path / "x.pt")
    gpt2 = json.loads((tmp_path / "gpt2_untied_no_bias" / "hf" / "config.json").read_text())
    assert gpt2["n_ctx"] == 64  # llama.cpp's convert_hf_to_gguf reads the GPT-2 context from n_ctx
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        root = {str(tmp_path)!r}
        x = torch.load(root + "/x.pt")
        for name, cls in {cases!r}.items():
            m = AutoModelForCausalLM.from_pretrained(f"{{root}}/{{name}}/hf").eval()
            assert type(m).__name__ == cls, (name, type(m).__name__)
            with torch.no_grad():
                torch.testing.assert_close(m(x).logits, torch.load(f"{{root}}/{{name}}/expected.pt"), atol=1e-4, rtol=0)
            greedy = torch.load(f"{{root}}/{{name}}/greedy.pt")
            out = m.generate(x[:1, :5], max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert torch.equal(out, greedy), name
            print("EXPORT_OK", name, cls)
        assert "gpt2_accel" not in sys.modules
        """
    )
    proc = run_without_package(script, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("EXPORT_OK") == len(EXPORTS)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(attn_type="GK"), ["attn_type='GK'"]),
        (
            dict(ROTARY, mlp_type="swiglu", n_kv_head=2, sliding_window=4, attention_sinks=True),
            ["attention_sinks=True"],
        ),
        (dict(position_embedding_type="rope"), ["norm_type='layernorm'", "mlp_type='gelu'"]),
        (dict(ROTARY, mlp_type="swiglu", final_logit_softcapping=30.0), ["final_logit_softcapping"]),
        (
            dict(ROTARY, mlp_type="swiglu", sliding_window=4),
            ["sliding_window (per-layer windows: Qwen3 only)"],
        ),
    ],
)
def test_a_config_no_class_computes_is_refused_with_its_blockers(tmp_path, capsys, options, named):
    tiny_model(**options).save_pretrained(tmp_path / "ours")
    with pytest.raises(SystemExit) as exit_info:
        main(["--to-hf", str(tmp_path / "ours"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no standard transformers class computes this model exactly" in err
    for n in named:
        assert n in err
    assert "trust_remote_code" in err and not (tmp_path / "out").exists()


def test_export_class_picks_the_narrowest_exact_class():
    assert export_class(tiny_model().config) == "gpt2"
    for name, (options, cls) in EXPORTS.items():
        assert type(to_hf(tiny_model(**options))).__name__ == cls, name


def _tiny_hf(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=127, eos_token_id=127, pad_token_id=None,
    )  # fmt: skip
    if model_type == "llama":
        kw.update(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    if model_type == "qwen3":
        kw.update(head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    return jitter(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval(), scale=0.1)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "nanochat"])
def test_from_hf_imports_the_standard_classes_and_round_trips(tmp_path, model_type):
    hf = _tiny_hf(model_type)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(ours).__name__ == "GPT2AccelForCausalLM"
    x = ids(t=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, atol=1e-4, rtol=0)
    back = to_hf(ours)
    assert type(back) is type(hf)
    ref = hf.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_from_hf_refuses_what_we_do_not_compute():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, hidden_act="gelu")  # fmt: skip
    with pytest.raises(ValueError, match=r"hidden_act='gelu' \(needs 'silu'\)"):
        from_hf(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.slow
def test_a_llama_checkpoint_finetunes_with_our_trainer(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from gpt2_accel.tokenization import get_tokenizer
    from gpt2_accel.trainer import Trainer

    cfg = AutoConfig.for_model(
        "llama", vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=50256,
        eos_token_id=50256,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    get_tokenizer("gpt2").save_pretrained(tmp_path / "llama")
    overrides = dict(
        init_from=str(tmp_path / "llama"), dataset_name="bundled:shakespeare", tokenizer_name="gpt2",
        block_size=32, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
        max_eval_samples=4, eval_steps=2, save_steps=2, logging_steps=1, output_dir=str(tmp_path / "run"),
        dataloader_num_workers=0, bf16=False, torch_compile=False, warmup_steps=1, report_to=["none"],
    )  # fmt: skip
    final = Trainer.from_recipe_file(None, overrides).train()
    assert final["step"] == 2 and final["val_loss"] > 0
    assert main(["--to-hf", str(tmp_path / "run"), "--output", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back).__name__ == "LlamaForCausalLM"
