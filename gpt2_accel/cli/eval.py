"""``gpt2-accel eval``: loss/perplexity, HellaSwag or lm-evaluation-harness tasks (library: :mod:`gpt2_accel.evaluation`)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..evaluation import (
    _check_compatible,
    _max_positions,
    default_tokenizer_name,
    evaluate_loss,
    load_hellaswag,
    load_model,
    save_results,
    score_hellaswag,
)
from ..run_files import EvalResults, update_eval_results
from .common import command_parser, fail, parse_known


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        "eval",
        "Loss/perplexity on a dataset, or HellaSwag accuracy, of any causal LM. Run under "
        "`accelerate launch` to spread the work over processes (same result as one process). Extra "
        "--key=value arguments after a recipe override its keys.",
    )
    p.add_argument("recipe", nargs="?", help="optional recipe YAML (model = init_from, data = its data keys)")
    p.add_argument("--model", help="run/model directory or Hub id (default: the recipe's init_from)")
    p.add_argument(
        "--data",
        help="--task loss: a dataset (Hub id, local files, 'bundled:shakespeare', as the recipe's dataset_name); "
        "--task hellaswag: the official jsonl path or a Hub id (default: the recipe's hellaswag_data)",
    )
    p.add_argument(
        "--task",
        type=_task,
        default="loss",
        help="loss, hellaswag, or lm_eval:<task>[,<task>...] to run lm-evaluation-harness's tasks (its HF backend)",
    )
    p.add_argument(
        "--split",
        help="loss with --data: the split of that dataset to score (default 'train', the only split of local "
        "files); loss from a recipe without --data: replaces validation_split; hellaswag from the Hub: default "
        "'validation'",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        help="loss: evaluate about this many tokens (default: max_eval_samples windows)",
    )
    p.add_argument("--max_examples", type=int, help="hellaswag: score only the first N examples")
    p.add_argument(
        "--batch_size", type=int, help="windows (loss) or examples (hellaswag) per forward per process"
    )
    p.add_argument(
        "--block_size", type=int, help="loss: window length (default: the recipe's, else the model's)"
    )
    p.add_argument("--text_column", help="column holding the text (default 'text')")
    p.add_argument("--dataset_config_name", help="Hub dataset configuration, e.g. wikitext-103-raw-v1")
    p.add_argument(
        "--tokenizer", help="tokenizer name/dir (default: the model's own, 'gpt2' for OpenAI GPT-2)"
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights dtype"
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow Hub models with their own code")
    p.add_argument("--include_path", help="lm_eval: a directory of your own lm-evaluation-harness task YAMLs")
    p.add_argument(
        "--limit", type=float, help="lm_eval: score only this many documents per task (< 1: a fraction)"
    )
    p.add_argument("--num_fewshot", type=int, help="lm_eval: few-shot examples (default: each task's own)")
    p.add_argument(
        "--output",
        help="results JSON (default: <model_dir>/eval_results_<task>.json, or "
        "./eval_results_<task>.json for a Hub id)",
    )
    return p


def _task(value: str) -> str:
    if value in ("loss", "hellaswag") or value.startswith("lm_eval:"):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose loss, hellaswag or lm_eval:<task>[,<task>...]")


def _print_table(result: dict, keys: list[str]) -> None:
    width = max(len(k) for k in keys)
    print("-" * (width + 20))
    for k in keys:
        v = result[k]
        text = f"{v:.6f}" if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text}")
    print("-" * (width + 20))


def _lm_eval(args: argparse.Namespace, model_name: str) -> int:
    """The ``lm_eval:`` branch of ``gpt2-accel eval`` (args from its parser)."""
    from ..harness import parse_tasks, run_lm_eval
    from ..locate import resolve_model

    tasks = parse_tasks(args.task)
    path = resolve_model(model_name)
    # The harness logs every request batch and task build at INFO; the console keeps progress and results.
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = run_lm_eval(
        path,
        tasks,
        include_path=args.include_path,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size or 8,
        device=device,
        dtype=args.dtype,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        trust_remote_code=args.trust_remote_code,
    )
    result = {"task": args.task, "model": model_name, "backend": "lm-evaluation-harness", **res}
    try:
        from importlib.metadata import version

        result["lm_eval_version"] = version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    output = args.output
    if output is None:
        base = Path(path) if Path(path).is_dir() else Path(".")
        output = str(base / "eval_results_lm_eval.json")
    written = save_results(output, result)
    if Path(model_name).is_dir():  # a run or model directory: its eval_results.json gets the scores too
        scores = {
            task: {
                k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            for task, metrics in res["results"].items()
        }
        written = f"{written} and {update_eval_results(model_name, EvalResults(lm_eval=scores))}"
    print(f"lm-evaluation-harness {','.join(tasks)} of {model_name} ({device})")
    for task, metrics in res["results"].items():
        for k, v in metrics.items():
            if k == "alias" or "stderr" in k:
                continue
            err = metrics.get(k.replace(",", "_stderr,", 1))
            shown = f"{v:.4f}" if isinstance(v, float) else str(v)
            if isinstance(err, float):
                shown += f" +- {err:.4f}"
            print(f"  {task:<24} {k:<20} {shown}")
    print(f"wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel eval``: print a table and write a JSON of the results (main process only)."""
    parser = _parser()
    args, extra = parse_known(parser, argv)
    from ..recipe import DataArguments, RecipeError, load_recipe

    recipe = None
    if args.recipe is not None and not args.recipe.endswith((".yaml", ".yml")):
        # argparse takes the first bare word as the recipe, e.g. the value of "--init_from x recipe.yaml".
        parser.error(
            f"{args.recipe!r} is not a recipe file (.yaml); give the recipe first, overrides as --key=value"
        )
    if args.recipe is not None:
        try:
            recipe = load_recipe(args.recipe, extra)
        except RecipeError as e:
            parser.error(str(e))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)} (--key=value overrides need a recipe file)")

    model_name = args.model or (recipe.model.init_from if recipe is not None else None)
    if not model_name or model_name in ("scratch", "resume"):
        parser.error(
            "give --model (a run/model directory or Hub id), or a recipe whose init_from names a model"
        )

    if args.task.startswith("lm_eval:"):
        try:
            return _lm_eval(args, model_name)
        except (ImportError, ValueError) as e:
            fail(parser, e)

    from accelerate import Accelerator

    from ..tokenization import get_tokenizer

    accelerator = Accelerator()
    dtype = getattr(torch, args.dtype)
    model = load_model(model_name, dtype=dtype, trust_remote_code=args.trust_remote_code).to(
        accelerator.device
    )
    tok_name = args.tokenizer or (recipe.data.tokenizer_name if recipe is not None else None)
    tok_name = tok_name or default_tokenizer_name(model_name)
    tokenizer = get_tokenizer(tok_name)

    result: dict[str, Any] = {"task": args.task, "model": model_name, "tokenizer": tok_name}
    if args.task == "loss":
        if recipe is not None:
            data = recipe.data
        else:
            if args.data is None:
                parser.error("--task loss needs --data (a Hub dataset id or local files) or a recipe")
            data = DataArguments()
        if args.data is not None:
            # --data names the evaluation set itself: all of its --split (default train_split, 'train', the only
            # split of local files) is scored, not the part training would hold out.
            data.validation_dataset_name = args.data
            data.validation_split = args.split
        elif args.split is not None:
            data.validation_split = args.split
        if args.text_column is not None:
            data.text_column = args.text_column
        if args.dataset_config_name is not None:
            data.dataset_config_name = args.dataset_config_name
        if data.validation_dataset_name is not None:
            source, split = data.validation_dataset_name, data.validation_split or data.train_split
        elif data.validation_split is not None:
            source, split = data.dataset_name, data.validation_split
        else:  # the trainer's validation: documents held out of the training split
            source = data.dataset_name
            split = f"{data.train_split} (held-out {data.validation_split_percentage}%)"
        data.tokenizer_name = tok_name
        block_size = args.block_size or data.block_size or _max_positions(model)
        if block_size is None:
            parser.error("the model does not say its context length; pass --block_size")
        _check_compatible(model, tokenizer, block_size)
        max_samples = math.ceil(args.max_tokens / block_size) if args.max_tokens else data.max_eval_samples
        batch_size = args.batch_size or (
            recipe.training.per_device_eval_batch_size if recipe is not None else 8
        )

        from ..data import build_eval_windows

        windows = build_eval_windows(
            data,
            tokenizer,
            block_size=block_size,
            max_samples=max_samples,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        result.update(evaluate_loss(model, windows, batch_size=batch_size, accelerator=accelerator))
        if result["tokens"] == 0:
            raise ValueError(
                f"{source!r} split {split!r} gave no window of {block_size + 1} tokens; use more data, a smaller "
                "--block_size, or another --split"
            )
        result.update(data=source, split=split, block_size=block_size, windows=result["tokens"] // block_size)
        keys = ["loss", "perplexity", "tokens"]
    else:
        source = args.data or (recipe.training.hellaswag_data if recipe is not None else None)
        if source is None:
            parser.error(
                "--task hellaswag needs --data (the official jsonl path or a Hub id) or hellaswag_data"
            )
        max_examples = args.max_examples or (
            recipe.training.hellaswag_max_examples if recipe is not None else None
        )
        _check_compatible(model, tokenizer, None)
        examples = load_hellaswag(source, max_examples, split=args.split or "validation")
        result.update(
            score_hellaswag(
                model, tokenizer, examples, accelerator=accelerator, batch_size=args.batch_size or 8
            )
        )
        result.update(data=source)
        keys = ["acc", "acc_norm", "n"]
    result["num_processes"] = accelerator.num_processes
    result["dtype"] = args.dtype

    if accelerator.is_main_process:
        output = args.output
        if output is None:
            base = Path(model_name) if Path(model_name).is_dir() else Path(".")
            output = str(base / f"eval_results_{args.task}.json")
        path = save_results(output, result)
        if args.task == "hellaswag" and Path(model_name).is_dir():
            # next to the run's own results (the model card reads them); the validation loss there stays the
            # training run's own, measured on its recipe's windows, so `--task loss` writes only its own file
            hs = EvalResults(
                hellaswag_acc=result["acc"], hellaswag_acc_norm=result["acc_norm"], hellaswag_n=result["n"]
            )
            path = f"{path} and {update_eval_results(model_name, hs)}"
        print(f"{args.task} of {model_name} on {result['data']} ({accelerator.num_processes} process(es))")
        _print_table(result, keys)
        print(f"wrote {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
