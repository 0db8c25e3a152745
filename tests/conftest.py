"""Shared fixtures: tiny GPT-2 configurations and models that build in milliseconds on a CPU.

Import the helpers directly (``from conftest import tiny_config, tiny_model``) or use the fixtures.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM

# One intra-op thread per test process (and, through the environment, per process a test starts), unless the caller
# chose: scripts/test.sh runs two pytest-xdist workers on CI's two cores, and with torch's default of one thread
# per core each worker's second thread only waits for a core the other worker holds. Measured on the 2-core host
# under load: 5 training steps of test_magnitude_preserving's 4-layer tiny model take 0.1 s on one thread, 6 s on
# two. The launch helpers already give their processes OMP_NUM_THREADS=1; tests that need threads set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


def hf_generate(model, *args, **kwargs) -> torch.Tensor:
    """``model.generate()`` through transformers' own decoding loop: importing gpt2_accel plugs our decoder into
    generate() (GPT2AccelForCausalLM.fast_sample); a reference for that decoder must not run it."""
    model.fast_sample = None
    try:
        with torch.no_grad():
            return model.generate(*args, **kwargs)
    finally:
        del model.fast_sample


def ids(batch: int = 2, t: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, t), the same for the same seed."""
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def jitter(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (biases, norm gains too) so a swapped or untransposed weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous of processes on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Put before a script run by run_without_package: drop editable-install finders and source-tree paths, then prove
# gpt2_accel cannot be imported (else a test of loading without our package would pass for the wrong reason).
_HIDE_PACKAGE = """
import os, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
sys.path = [p for p in sys.path if "site-packages" in p or not os.path.isdir(os.path.join(p, "gpt2_accel"))]
try:
    import gpt2_accel
except ImportError:
    pass
else:
    raise SystemExit("gpt2_accel is importable: the test would not prove anything")
"""


def run_without_package(script: str, cwd: Path, *, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` as a user without our package would: a fresh ``python -I`` (no PYTHONPATH, no user site),
    ``cwd`` outside the repository, the Hub offline, and gpt2_accel unimportable."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.update(env)
    code = _HIDE_PACKAGE + textwrap.dedent(script)
    cmd = [sys.executable, "-I", "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config() -> GPT2AccelConfig:
    return tiny_config()


@pytest.fixture
def model() -> GPT2AccelForCausalLM:
    return tiny_model()


# ---------------------------------------------------------------------------------------------------------------
# A run directory written by the real trainer (the files every reader of a run directory is tested against)
# ---------------------------------------------------------------------------------------------------------------
RUN_SECRET = "hf_SECRETrecipeTOKEN123456"  # the run's hub_token: no file a reader publishes may show it
TRAINED_RUN_KEYS = dict(
    n_layer=2, n_head=2, n_embd=32, n_positions=32, dataset_name="bundled:shakespeare", tokenizer_name="gpt2",
    per_device_train_batch_size=2, per_device_eval_batch_size=4, max_eval_samples=4, dataloader_num_workers=0,
    max_steps=3, learning_rate=6e-4, warmup_steps=1, logging_steps=1, eval_steps=2, save_steps=1,
    save_total_limit=None, license="apache-2.0", hub_token=RUN_SECRET,
)  # fmt: skip


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory of a tiny model trained 3 steps by ``Trainer`` (checkpoints at steps 1, 2 and 3, an eval at
    step 2 and at the end). Shared by the session: copy it before changing anything in it."""
    from gpt2_accel.trainer import Trainer

    run = tmp_path_factory.mktemp("trained") / "tiny-run"
    Trainer(**TRAINED_RUN_KEYS, output_dir=str(run)).train()
    return run


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's CPU ops, compiled once before the launches that load them
# ---------------------------------------------------------------------------------------------------------------
# Every DeepSpeed launch on CPU loads the shared-memory all-reduce (deepspeed.comm, ShareMemCommBuilder) and the
# offload config DeepSpeedCPUAdam (CPUAdamBuilder). scripts/setup_env.sh installs deepspeed with both compiled in
# (scripts/deepspeed_wheel.sh), so loading them here takes seconds. Otherwise (DEEPSPEED_OPS=0, a failed wheel build,
# a venv made some other way) DeepSpeed compiles them just in time into ~/.cache/torch_extensions: 1-2 minutes on 2
# idle cores and several on loaded ones, inside a launch whose ranks have a 240 s timeout, and again in every fresh
# clone (torch's key for the build holds the venv's paths). Loading them here first, under its own timeout, keeps
# those launches to training (when two xdist workers get here together, torch's build lock makes one wait for the
# other's build). Every test that launches DeepSpeed carries @pytest.mark.usefixtures("deepspeed_ops").
_BUILD_DEEPSPEED_OPS = """
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
"""


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed's CPU ops, loaded (prebuilt, or compiled just in time) before any DeepSpeed launch of this session."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return  # the tests that need it skip, naming the extra
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", _BUILD_DEEPSPEED_OPS], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
