"""Folding a magnitude-preserving (EDM2) model into a plain one (gpt2_accel.fold), so it exports exactly: the folded
logits against the MP model's in float64 (exact when the norms have no epsilon, within the stated bound with one),
and `gpt2-accel export` of runs the real trainer wrote, loaded without our package (transformers, llama.cpp, ONNX
Runtime)."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from conftest import ids, run_without_package, tiny_config

from gpt2_accel import GPT2AccelForCausalLM
from gpt2_accel.cli.export import main as export_main
from gpt2_accel.convert import export_class, to_hf_gpt2
from gpt2_accel.fold import ROW_RMS_TOLERANCE, fold_magnitude_preserving, plain_model
from gpt2_accel.modeling_gpt2_accel import mp_normalize
from gpt2_accel.optim import attach_forced_weight_norm

MP = dict(magnitude_preserving=True, bias=False, norm_elementwise_affine=False)
NANOCHAT = dict(
    position_embedding_type="rope", norm_type="rmsnorm", mlp_type="relu2", qk_norm=True
)  # nanochat's blocks (ReLU^2)
ROPE_SWIGLU = dict(position_embedding_type="rope", norm_type="rmsnorm", mlp_type="swiglu")
SPEEDRUN = dict(ROPE_SWIGLU, qk_norm=True)  # recipes/speedrun.yaml's blocks

# name -> (options on top of MP, the standard class the fold exports as)
CASES = {
    "gpt2_tied": ({}, "gpt2"),
    "gpt2_untied_padded": (dict(tie_word_embeddings=False, pad_vocab_size_multiple=48), "gpt2"),
    "speedrun_tied": (SPEEDRUN, "qwen3"),
    "nanochat_tied": (NANOCHAT, "nanochat"),
    "nanochat_untied_gqa_softcap": (
        dict(NANOCHAT, tie_word_embeddings=False, n_kv_head=2, final_logit_softcapping=15.0),
        "nanochat",
    ),
    "nanochat_own_embedding_norm": (dict(NANOCHAT, norm_after_embedding=True), "nanochat"),
    "llama": (ROPE_SWIGLU, "llama"),
    "qwen3_sliding": (
        dict(
            ROPE_SWIGLU,
            qk_norm=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        "qwen3",
    ),
}


_TRAINED: dict[str, GPT2AccelForCausalLM] = {}


def trained_mp(gain: float = 2.5, seed: int = 0, **options) -> GPT2AccelForCausalLM:
    """A 4-layer MP model after 8 AdamW steps with forced weight normalisation (as the trainer attaches it), its
    block matrices then spread and its logit gain set to ``gain``: every constant of the fold is away from 1. A
    fresh copy each call."""
    key = repr((gain, seed, sorted(options.items())))
    if key not in _TRAINED:
        _TRAINED[key] = _train_mp(gain, seed, options)
    return copy.deepcopy(_TRAINED[key])


def _train_mp(gain: float, seed: int, options: dict) -> GPT2AccelForCausalLM:
    torch.manual_seed(seed)
    model = GPT2AccelForCausalLM(tiny_config(**{**MP, "n_layer": 4, **options}))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    attach_forced_weight_norm(model, opt, "NO")
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        x = torch.randint(0, 128, (4, 33), generator=g)
        model(x[:, :-1], shift_labels=x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        # 8 steps on random tokens leave a model that repeats one token: spread the block matrices (stored
        # normalised, as after a step) so that greedy decoding varies with the context
        for name, w in model.named_parameters():
            if ".h." in name:
                w.copy_(mp_normalize(w + 2 * torch.randn(w.shape, generator=g)))
        model.lm_head.gain.fill_(gain)
    return model.eval()


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("name", list(CASES))
def test_fold_is_exact_in_float64_when_the_norms_have_no_epsilon(name):
    """The algebra: with eps = 0 every norm ignores its input's scale exactly, so the folded model equals the MP
    model to float64 rounding. An embedding norm the fold adds (NanoChat's) is exact up to the spread of the
    embedding rows' RMS (~1e-9 for re-normalised rows)."""
    options, cls = CASES[name]
    mp = trained_mp(layer_norm_epsilon=0.0, **options).double()
    folded, report = fold_magnitude_preserving(mp)
    assert not folded.config.magnitude_preserving and export_class(folded.config) == cls
    assert export_class(mp.config) == cls  # what export_class says of the MP config is what it exports as
    assert report.tied == mp.config.tie_word_embeddings == folded.config.tie_word_embeddings
    assert report.added_embedding_norm == (cls == "nanochat" and not mp.config.norm_after_embedding)
    x = ids(t=20)
    want = _logits(mp, x)
    tol = 1e-12 + (10 * report.row_rms_spread if report.added_embedding_norm else 0.0)
    diff = (_logits(folded, x) - want).abs().max().item()
    assert diff <= tol * want.abs().max().item(), (diff, report)


@pytest.mark.parametrize("name", list(CASES))
def test_fold_with_the_default_epsilon_is_within_the_stated_bound(name):
    """With eps = 1e-5, each residual norm's output moves by a relative eps * eps_deviation / 2 at most (the
    folded stream is the MP stream divided by a different scale before each of the 2L + 1 norms; one eps serves
    them all). The logits stay within (2L + 1) times that, relative to their size, in float64 and (plus float32's
    own rounding, measured ~1e-5 here) in float32; greedy tokens are the same."""
    options, _ = CASES[name]
    mp = trained_mp(**options)
    folded, report = fold_magnitude_preserving(mp)
    L, eps = mp.config.n_layer, mp.config.layer_norm_epsilon
    bound = (2 * L + 1) * eps * report.eps_deviation / 2 + 10 * report.row_rms_spread
    x = ids(t=20)
    mp64, folded64 = copy.deepcopy(mp).double(), fold_magnitude_preserving(copy.deepcopy(mp).double())[0]
    want64 = _logits(mp64, x)
    scale = want64.abs().max().item()
    diff64 = (_logits(folded64, x) - want64).abs().max().item()
    assert 0 < diff64 <= bound * scale, (diff64, bound * scale, report)
    want, got = _logits(mp, x), _logits(folded, x)
    assert (got - want).abs().max().item() <= bound * scale + 3e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    greedy = [
        m.generate(x[:1, :4], max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 4:]
        for m in (mp, folded)
    ]
    assert torch.equal(*greedy), greedy
    if (
        not mp.config.tie_word_embeddings
    ):  # a tied head makes the last token predict itself: one repeated token
        assert len(set(greedy[0].tolist())) > 2, greedy


@pytest.mark.parametrize("gain", [-1.5, 0.0])
def test_a_tied_head_with_a_gain_of_zero_or_below_is_untied(gain):
    """A tied head keeps the embedding scaled by gain / sqrt(C): a gain <= 0 would flip or erase the stream."""
    mp = trained_mp(gain=gain, layer_norm_epsilon=0.0, **NANOCHAT).double()
    folded, report = fold_magnitude_preserving(mp)
    assert not report.tied and not folded.config.tie_word_embeddings
    x = ids(t=20)
    want = _logits(mp, x)
    assert (_logits(folded, x) - want).abs().max().item() <= 1e-7 * max(want.abs().max().item(), 1.0)


def test_the_fold_leaves_the_model_alone_and_plain_models_pass_through():
    mp = trained_mp(**SPEEDRUN)
    before = {k: v.clone() for k, v in mp.state_dict().items()}
    folded = plain_model(mp)
    assert folded is not mp and all(torch.equal(v, before[k]) for k, v in mp.state_dict().items())
    assert plain_model(folded) is folded
    with pytest.raises(ValueError, match="not magnitude_preserving"):
        fold_magnitude_preserving(folded)


def test_embedding_rows_of_different_rms_are_refused_where_nanochat_normalises_them():
    mp = trained_mp(**NANOCHAT)
    with torch.no_grad():
        mp.transformer.wte.weight[3] *= 0.01  # stored rows no longer normalised: mp_normalize gives RMS 0.99
    with pytest.raises(ValueError, match=r"embedding rows have one RMS; they differ by .*tolerance 1e-06"):
        fold_magnitude_preserving(mp)
    assert ROW_RMS_TOLERANCE == 1e-6
    plain_gpt2 = trained_mp()  # learned positions and no embedding norm: any rows fold exactly
    with torch.no_grad():
        plain_gpt2.transformer.wte.weight[3] *= 0.01
    fold_magnitude_preserving(plain_gpt2)


def test_unfolded_mp_weights_are_never_written_as_gpt2():
    with pytest.raises(ValueError, match=r"magnitude_preserving=True \(fold it first"):
        to_hf_gpt2(trained_mp())


# ------------------------------------------------------------------------------------------------ real runs

TRAIN = dict(
    n_layer=2, n_head=2, n_embd=32, n_positions=32, per_device_train_batch_size=4, max_steps=20,
    max_eval_samples=8, per_device_eval_batch_size=8, dataloader_num_workers=0, warmup_steps=2, eval_steps=0,
    save_steps=0, logging_steps=5, optim="muon", muon_learning_rate=0.5, learning_rate=0.05, min_lr=0.005,
    report_to=["none"], **MP,
)  # fmt: skip
RUNS = {
    "speedrun": (dict(SPEEDRUN), "Qwen3ForCausalLM"),  # recipes/speedrun.yaml's blocks, tied head
    "nanochat": (dict(NANOCHAT), "NanoChatForCausalLM"),
    "gpt2_untied": (dict(tie_word_embeddings=False), "GPT2LMHeadModel"),
}
PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def mp_runs(tmp_path_factory) -> dict[str, object]:
    """Run directories the real trainer wrote (Muon + AdamW, forced weight normalisation), 20 steps each."""
    from gpt2_accel.trainer import Trainer

    root = tmp_path_factory.mktemp("mp_runs")
    for name, (options, _) in RUNS.items():
        Trainer(**TRAIN, **options, output_dir=str(root / name)).train()
    return root


def _ours(run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run).eval()
    assert model.config.magnitude_preserving
    return model


def _tokens(run, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run)(text)["input_ids"]


def test_hf_export_of_mp_runs_loads_in_the_standard_class_without_our_package(mp_runs, tmp_path):
    """The exported directory, loaded by transformers alone: its logits on a line of the corpus equal the MP run's
    within the fold's bound (every position predicts the same token) and its greedy continuation is the same.
    (After 20 steps the runs mostly predict newlines and commas; the sharper models above check varied greedy
    decoding.)"""
    from gpt2_accel.data.sources import BUNDLED

    text = BUNDLED["shakespeare"].read_text(encoding="utf-8")[5000:5120]
    expected = {}
    for name, (_, cls) in RUNS.items():
        run, out = mp_runs / name, tmp_path / name
        assert export_main([str(run), "--format", "hf", "--output", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert "auto_map" not in config and not list(out.glob("*.py"))
        ours = _ours(run)
        x = torch.tensor([_tokens(run, text)[:32]])
        with torch.no_grad():
            logits = ours(x).logits
        greedy = ours.generate(x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=16,
                               do_sample=False, pad_token_id=0)[0, 8:].tolist()  # fmt: skip
        torch.save((x, logits), tmp_path / f"{name}.pt")
        expected[name] = (cls, greedy)
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        root = {str(tmp_path)!r}
        for name, (cls, greedy) in {expected!r}.items():
            m = AutoModelForCausalLM.from_pretrained(f"{{root}}/{{name}}").eval()
            assert type(m).__name__ == cls, (name, type(m).__name__)
            x, want = torch.load(f"{{root}}/{{name}}.pt")
            with torch.no_grad():
                got = m(x).logits
            out = m.generate(x[:, :8], attention_mask=torch.ones_like(x[:, :8]), max_new_tokens=16, do_sample=False,
                             pad_token_id=0)
            print(json.dumps([name, (got - want).abs().max().item(), want.abs().max().item(),
                              torch.equal(got.argmax(-1), want.argmax(-1)), out[0, 8:].tolist() == greedy]))
        assert "gpt2_accel" not in sys.modules
        """
    )
    proc = run_without_package(script, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(rows) == len(RUNS)
    for name, diff, scale, same_argmax, same_greedy in rows:
        print(f"{name}: max |logit diff| {diff:.2e} at max |logit| {scale:.1f}")
        assert diff <= 2e-5 * scale + 3e-5, name  # the fold's eps bound (above) plus float32 rounding
        assert same_argmax and same_greedy, name


@pytest.mark.slow
def test_gguf_and_onnx_of_an_mp_gpt2_run_compute_its_logits(mp_runs, tmp_path):
    """llama.cpp and ONNX Runtime run the folded GPT-2 (the MP run with GPT-2 blocks)."""
    import numpy as np

    pytest.importorskip("onnxruntime")
    from test_export import _greedy, _llama_cpp, _llama_cpp_run

    run = mp_runs / "gpt2_untied"
    ours, x = _ours(run), _tokens(run, PROMPT)
    onnx_dir = tmp_path / "onnx"
    assert export_main([str(run), "--format", "onnx", "--output", str(onnx_dir)]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_ids": np.array([x], dtype=np.int64)})[0])
    want = _logits(ours, torch.tensor([x]))
    print(
        f"onnxruntime: max |logit diff| {(got - want).abs().max().item():.2e} at max |logit| {want.abs().max():.1f}"
    )
    assert (got - want).abs().max().item() <= 2e-5 * want.abs().max().item() + 3e-5
    _llama_cpp()
    gguf = tmp_path / "mp.gguf"
    assert export_main([str(run), "--format", "gguf", "--output", str(gguf)]) == 0
    tokens, logits, got = _llama_cpp_run(gguf, x, 16)
    assert tokens == x  # the GGUF's own tokenizer
    want = _logits(ours, torch.tensor([x]))[0, -1]
    span = (want.max() - want.min()).item()
    # test_export's f32 tolerance: llama.cpp keeps its KV cache in f16 (measured <= 8e-4 of the span)
    print(f"llama.cpp: max |logit diff| {(logits - want).abs().max().item():.2e}, span {span:.1f}")
    torch.testing.assert_close(logits, want, atol=1e-3 * span, rtol=0)
    assert got == _greedy(ours, x, 16)  # a 20-step run: mostly newlines and commas, as transformers gives


@pytest.mark.slow
def test_gguf_of_a_speedrun_run_runs_in_llama_cpp_as_qwen3(mp_runs, tmp_path):
    """recipes/speedrun.yaml's blocks (rope, RMSNorm, SwiGLU, QK-norm) fold into a Qwen3, which llama.cpp runs."""
    from gguf import GGUFReader
    from test_export import _greedy, _llama_cpp, _llama_cpp_run

    _llama_cpp()
    run = mp_runs / "speedrun"
    ours, x = _ours(run), _tokens(run, PROMPT)
    gguf = tmp_path / "speedrun.gguf"
    assert export_main([str(run), "--format", "gguf", "--output", str(gguf)]) == 0
    arch = GGUFReader(str(gguf)).fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen3"
    tokens, logits, got = _llama_cpp_run(gguf, x, 16)
    assert tokens == x
    want = _logits(ours, torch.tensor([x]))[0, -1]
    span = (want.max() - want.min()).item()
    print(
        f"llama.cpp (qwen3 fold): max |logit diff| {(logits - want).abs().max().item():.2e}, span {span:.1f}"
    )
    torch.testing.assert_close(logits, want, atol=1e-3 * span, rtol=0)
    assert got == _greedy(ours, x, 16)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_formats_that_lack_the_folded_class_refuse_naming_it_and_convert_writes_it(fmt, tmp_path, capsys):
    """nanochat's blocks fold into a NanoChat: `convert --to-hf` writes it; GGUF (no NanoChat writer) and ONNX
    (GPT-2 graphs only) refuse before writing, naming the class."""
    from gpt2_accel.cli.convert import main as convert_main

    trained_mp(**NANOCHAT).save_pretrained(tmp_path / "run")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path / "run"), "--format", fmt, "--output", str(out)])
    assert exit_info.value.code == 2 and "nanochat" in capsys.readouterr().err and not out.exists()
    assert convert_main(["--to-hf", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    assert "wrote NanoChatForCausalLM" in capsys.readouterr().out
