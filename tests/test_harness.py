"""`gpt2-accel eval --task lm_eval:<tasks>`: lm-evaluation-harness's HF backend on our model, with a local task
(YAML + jsonl written here; nothing from the Hub), against log-likelihoods computed directly from our model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

DOCS = [
    ("The king is dead, long live the", ["king", "river", "seven"], 0),
    ("To be, or not to", ["be", "sing", "table"], 0),
    ("Once upon a", ["time", "horse", "dream"], 1),
    ("She opened the door and saw a", ["ghost", "cat", "mountain"], 2),
    ("One, two, three,", ["four", "blue", "dog"], 0),
    ("The sun rises in the", ["east", "west", "kitchen"], 1),
    ("My kingdom for a", ["horse", "sandwich", "kingdom"], 0),
    ("All the world's a", ["stage", "bus", "apple"], 2),
]

TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A 2-layer GPT-2 with GPT-2's BPE, weights spread wider than the init so the choices differ."""
    from conftest import tiny_model

    from gpt2_accel.tokenization import get_tokenizer

    model = tiny_model(vocab_size=50257, n_positions=64, initializer_range=0.3)
    out = tmp_path / "model"
    model.save_pretrained(out)
    get_tokenizer("gpt2").save_pretrained(out, model_max_length=64)
    return out


def _task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tasks"
    d.mkdir()
    data = d / "tiny.jsonl"
    data.write_text(
        "".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in DOCS)
    )
    (d / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return d


def _reference_acc(model_dir: Path) -> float:
    """Pick the choice with the highest summed log-probability of ' ' + choice after the context."""
    from transformers import AutoModelForCausalLM

    from gpt2_accel.tokenization import get_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = get_tokenizer("gpt2")
    right = 0
    for context, choices, label in DOCS:
        scores = []
        for choice in choices:
            ctx, cont = tok.encode(context), tok.encode(" " + choice)
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits.double(), -1)[0]
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return right / len(DOCS)


def test_lm_eval_local_task_scores_like_our_loglikelihoods(model_dir, tmp_path, capsys):
    from gpt2_accel.cli.eval import main

    tasks = _task_dir(tmp_path)
    assert (
        main(["--model", str(model_dir), "--task", "lm_eval:tiny_choice", "--include_path", str(tasks)]) == 0
    )
    result = json.loads((model_dir / "eval_results_lm_eval.json").read_text())
    acc = result["results"]["tiny_choice"]["acc,none"]
    want = _reference_acc(model_dir)
    assert 0 < want < 1, "the test model should get some right and some wrong"
    assert acc == pytest.approx(want)
    assert result["task"] == "lm_eval:tiny_choice" and result["n-samples"]["tiny_choice"]["effective"] == len(
        DOCS
    )
    out = capsys.readouterr().out
    assert "tiny_choice" in out and "eval_results_lm_eval.json" in out
    # filed next to the model's own results, which stay (issue 19: "next to ours in eval_results.json")
    (model_dir / "eval_results.json").write_text(json.dumps({"val_loss": 3.5}))
    assert (
        main(["--model", str(model_dir), "--task", "lm_eval:tiny_choice", "--include_path", str(tasks)]) == 0
    )
    merged = json.loads((model_dir / "eval_results.json").read_text())
    assert merged["val_loss"] == 3.5 and merged["lm_eval"]["tiny_choice"]["acc,none"] == pytest.approx(want)
    assert "alias" not in merged["lm_eval"]["tiny_choice"]


def test_lm_eval_unknown_task_is_a_clear_error(model_dir, tmp_path, capsys):
    from gpt2_accel.cli.eval import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(model_dir), "--task", "lm_eval:no_such_task", "--include_path", str(tmp_path)])
    assert e.value.code == 2
    assert "lm-evaluation-harness has no task 'no_such_task'" in capsys.readouterr().err
    assert not (model_dir / "eval_results_lm_eval.json").exists()
