"""EleutherAI's lm-evaluation-harness as an evaluation backend (``gpt2-accel eval --task lm_eval:<tasks>``).

The harness's own Hugging Face backend (``lm_eval.models.huggingface.HFLM``) loads the model by path, through
``AutoModelForCausalLM``: our run directories load with the classes this package registers, vanilla exports and
Hub models as usual. Its results (per task metrics, versions, n-shot) are written next to ours, as
``eval_results_lm_eval.json`` in the model directory, with the same ``evaluate.save`` metadata.

Tasks are the harness's names (``hellaswag``, ``lambada_openai``, ``arc_easy,arc_challenge``...) or tasks of
your own: ``--include_path DIR`` adds the task YAML files in DIR (the harness's option of the same name), which
is how local data files are scored without the Hub.
"""

from __future__ import annotations

from typing import Any

PREFIX = "lm_eval:"


def parse_tasks(task: str) -> list[str]:
    """``lm_eval:hellaswag,arc_easy`` -> ``["hellaswag", "arc_easy"]``; a ValueError when no task is named."""
    names = [t.strip() for t in task[len(PREFIX) :].split(",") if t.strip()]
    if not task.startswith(PREFIX) or not names:
        raise ValueError(f"--task {task!r}: name lm-evaluation-harness tasks as lm_eval:<task>[,<task>...]")
    return names


def run_lm_eval(
    model: str,
    tasks: list[str],
    *,
    include_path: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score ``model`` (directory or Hub id) on lm-evaluation-harness ``tasks``; returns the harness's results,
    versions, n-shot and configs as a JSON-able dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            "--task lm_eval:... needs lm-evaluation-harness: pip install 'gpt2_accel[lm_eval]'"
        ) from e
    from . import GPT2AccelConfig  # noqa: F401 -- registers our Auto classes for the harness's loader

    task_manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (--include_path DIR adds your own task YAMLs)"
        raise ValueError(f"lm-evaluation-harness has no task {', '.join(map(repr, unknown))}{where}")
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer or model,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    keep = ("results", "versions", "n-shot", "n-samples", "higher_is_better")
    return {k: _jsonable(out[k]) for k in keep if k in out}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
