"""GPT-2 parity: transformers' GPT2LMHeadModel <-> GPT2AccelForCausalLM, weights, logits, generation and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ids, jitter, tiny_hf_gpt2, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from gpt2_accel import GPT2AccelForCausalLM
from gpt2_accel.cli.convert import main
from gpt2_accel.convert import from_hf_gpt2, to_hf_gpt2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x, use_cache=False).logits


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_from_hf_gives_gpt2_logits(attn_implementation):
    hf = jitter(tiny_hf_gpt2())
    ours = from_hf_gpt2(hf)
    ours.set_attn_implementation(attn_implementation)
    assert isinstance(ours, GPT2AccelForCausalLM) and not ours.training
    assert ours.lm_head.weight is ours.transformer.wte.weight
    x = ids(t=16)
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=1e-4, rtol=0)


def test_to_hf_gives_our_logits_and_round_trips_exactly():
    ours = jitter(tiny_model())
    hf = to_hf_gpt2(ours)
    assert type(hf) is GPT2LMHeadModel and hf.config.model_type == "gpt2"
    assert hf.lm_head.weight is hf.transformer.wte.weight
    x = ids(t=16)
    torch.testing.assert_close(logits(hf, x), logits(ours, x), atol=1e-4, rtol=0)
    back = from_hf_gpt2(hf)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_conv1d_weights_are_transposed():
    hf = tiny_hf_gpt2()
    ours = from_hf_gpt2(hf)
    conv = hf.transformer.h[1].mlp.c_fc.weight  # Conv1D: (in, out) = (64, 256)
    assert conv.shape == (64, 256)
    assert torch.equal(ours.transformer.h[1].mlp.c_fc.weight, conv.T)


def test_greedy_generation_matches_hf_generate():
    hf = jitter(tiny_hf_gpt2())
    ours = from_hf_gpt2(hf)
    x = ids(2, 6)
    kw = dict(
        max_new_tokens=25,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        attention_mask=torch.ones_like(x),
    )
    assert torch.equal(ours.generate(x, **kw), hf.generate(x, **kw))


def test_left_padded_generation_matches_hf_generate():
    hf = jitter(tiny_hf_gpt2())
    ours = from_hf_gpt2(hf)
    x = ids(2, 8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert torch.equal(ours.generate(x, **kw), hf.generate(x, **kw))


def test_overrides_apply_to_the_converted_config():
    hf = jitter(tiny_hf_gpt2(vocab_size=100, bos_token_id=99, eos_token_id=99))
    ours = from_hf_gpt2(hf, dropout=0.0, pad_vocab_size_multiple=64, n_positions=32)
    assert ours.config.dropout == 0.0 and ours.config.n_positions == 32
    assert ours.transformer.wte.weight.shape == (128, 64) and ours.transformer.wpe.weight.shape == (32, 64)
    x = ids(t=16, vocab=100)
    torch.testing.assert_close(
        logits(ours, x), logits(hf, x), atol=1e-4, rtol=0
    )  # same function, padding unseen
    assert from_hf_gpt2(hf).config.dropout == 0.1  # GPT-2's own rate by default
    gk = from_hf_gpt2(hf, attn_type="GK", dropout=0.1)
    assert (gk.config.attn_type, gk.config.dropout) == ("GK", 0.1)
    assert torch.equal(gk.transformer.h[0].attn.c_attn.weight, ours.transformer.h[0].attn.c_attn.weight)


def test_shape_changing_overrides_are_refused():
    hf = tiny_hf_gpt2()
    with pytest.raises(ValueError, match=r"cannot override \['n_layer'\].*shape"):
        from_hf_gpt2(hf, n_layer=4)
    with pytest.raises(ValueError, match="exceeds the checkpoint's 64 learned positions"):
        from_hf_gpt2(hf, n_positions=128)


def test_unsupported_gpt2_variants_are_refused():
    with pytest.raises(ValueError, match="activation_function='relu'"):
        from_hf_gpt2(tiny_hf_gpt2(activation_function="relu"))
    with pytest.raises(ValueError, match="attention scaling"):
        from_hf_gpt2(tiny_hf_gpt2(scale_attn_by_inverse_layer_idx=True))


def test_to_hf_refuses_non_softmax_attention():
    with pytest.raises(
        ValueError, match=r"attn_type='GK' has no GPT2LMHeadModel equivalent.*trust_remote_code"
    ):
        to_hf_gpt2(tiny_model(attn_type="GK"))


def test_to_hf_drops_padded_rows_and_fills_missing_biases():
    ours = jitter(tiny_model(vocab_size=100, pad_vocab_size_multiple=64, bias=False))
    hf = to_hf_gpt2(ours)
    assert hf.transformer.wte.weight.shape == (100, 64) and hf.config.vocab_size == 100
    assert hf.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    x = ids(t=16, vocab=100)
    torch.testing.assert_close(logits(hf, x), logits(ours, x), atol=1e-4, rtol=0)


def test_exported_directory_is_vanilla_gpt2(tmp_path):
    ours = jitter(tiny_model())
    to_hf_gpt2(ours).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    assert not list(tmp_path.glob("*.py"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is GPT2LMHeadModel
    x = ids(t=16)
    torch.testing.assert_close(logits(loaded, x), logits(ours, x), atol=1e-4, rtol=0)


def test_from_hf_accepts_a_local_directory_and_rejects_ours(tmp_path):
    hf = jitter(tiny_hf_gpt2())
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf_gpt2(str(tmp_path / "hf"))
    x = ids(t=16)
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"model_type=.gpt2_accel.*AutoModelForCausalLM.from_pretrained"):
        from_hf_gpt2(tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_hf_gpt2(str(tmp_path / "missing"))


def test_cli_round_trip_keeps_tokenizer_and_logits(tmp_path, capsys):
    from gpt2_accel.tokenization import get_tokenizer

    hf = jitter(tiny_hf_gpt2(vocab_size=257, bos_token_id=256, eos_token_id=256))
    hf.save_pretrained(tmp_path / "hf")
    get_tokenizer("char").save_pretrained(tmp_path / "hf")
    assert (
        main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"), "--dropout", "0"]) == 0
    )
    assert "tokenizer from" in capsys.readouterr().out
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(ours) is GPT2AccelForCausalLM and ours.config.dropout == 0.0
    assert main(["--to-hf", str(tmp_path / "ours"), "--output", str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back) is GPT2LMHeadModel
    assert len(AutoTokenizer.from_pretrained(tmp_path / "back")) == 257
    x = ids(t=16, vocab=257)
    torch.testing.assert_close(logits(ours, x), logits(hf, x), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(back, x), logits(hf, x), atol=1e-4, rtol=0)


def test_cli_writes_the_bundled_gpt2_tokenizer_when_the_source_has_none(tmp_path):
    tiny_hf_gpt2(
        vocab_size=50257, n_embd=32, n_head=2, n_layer=1, bos_token_id=50256, eos_token_id=50256
    ).save_pretrained(tmp_path / "hf")
    assert main(["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert len(tok) == 50257 and tok.decode(tok("Hello world")["input_ids"]) == "Hello world"


def test_cli_errors_are_one_line_with_the_fix(tmp_path, capsys):
    tiny_model(attn_type="GK").save_pretrained(tmp_path / "gk")
    with pytest.raises(SystemExit) as exit_info:
        main(["--to-hf", str(tmp_path / "gk"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "trust_remote_code" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--to-hf", str(tmp_path / "gk"), "--output", str(tmp_path / "out"), "--attn-type", "SM"])


def test_hub_id_offline_fails_with_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty_hf_home"), PYTHONPATH=REPO)
    code = f"from gpt2_accel.cli.convert import main; main(['--from-hf', 'gpt2', '--output', {str(tmp_path / 'o')!r}])"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert "it is not a local directory and the Hugging Face Hub is offline" in proc.stderr
    assert "pass that directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hub_id_offline_in_process(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"needs the Hugging Face Hub or its files in the local cache"):
        from_hf_gpt2("gpt2-xl-does-not-exist")


@pytest.mark.slow
def test_gpt2_124m_shape_parity_both_directions():
    from transformers import GPT2Config

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the real 124M shape, random weights
    ours = from_hf_gpt2(hf)
    assert ours.config.vocab_size == 50257 and ours.num_parameters() == hf.num_parameters() == 124_439_808
    x = ids(1, 64, vocab=50257)
    ref = logits(hf, x)
    torch.testing.assert_close(logits(ours, x), ref, atol=1e-4, rtol=0)
    padded = from_hf_gpt2(hf, pad_vocab_size_multiple=64)
    assert padded.transformer.wte.weight.shape[0] == 50304  # nanoGPT's padded vocabulary
    torch.testing.assert_close(logits(padded, x), ref, atol=1e-4, rtol=0)
    back = to_hf_gpt2(padded)
    torch.testing.assert_close(logits(back, x), ref, atol=1e-4, rtol=0)
