"""LoRA RLVR trainer: `python -m apo_llm.train [--config FILE.yaml] [--section.field VALUE ...]`.

This module parses the command line (apo_llm.config, through the project's one parser
apo_llm.options) and hands the run to its engine:

    train.engine: native  ->  apo_llm.loop.train        (this package's loop, one process)
    train.engine: trl     ->  apo_llm.trl_engine.train_trl  (inside TRL's GRPOTrainer: several
                                                           processes, DeepSpeed / FSDP, vLLM)

Both engines build their runs from apo_llm.run_setup (data, base model, LoRA, the run directory
and its guards) and compute the loss with apo_llm.objectives.policy_loss. From here to the loss
formula: main -> loop.train -> loop.update -> objectives.policy_loss -> the registered term
(`POLICY_TERMS[cfg.name]`, e.g. objectives.apo_term); docs/architecture.md maps every module.

With no arguments the embedded default runs APO on the project's tiny Llama and the synthetic
arithmetic task on CPU in a few minutes. User errors (a config field, a path, the run directory)
exit with one line, code 2; SIGTERM / SIGINT checkpoint the step under way and exit 143 / 130.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from apo_llm.cli import UserError, fail
from apo_llm.config import load_config
# the native engine's public pieces, importable from here as before (benchmarks, notebooks, tests)
from apo_llm.loop import (  # noqa: F401
    Setup, behaviour_and_reference, refuse_several_processes, setup, single_pass, train, update,
)
from apo_llm.loop_state import NonFiniteError
from apo_llm.run_setup import PromptSampler, add_lora, load_base, load_data  # noqa: F401


def _leave_process_group() -> None:
    """A rank that stops on an error tears its process group down first: exiting with a gloo group
    alive can abort the process at interpreter exit (C++ "terminate called without an active
    exception", SIGABRT, seen on one rank of two) instead of exiting with the error's code."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        refuse_several_processes(cfg)
    except ValueError as e:
        fail(f"config error: {e}")
    try:
        if cfg.train.engine == "trl":
            from apo_llm.trl_engine import train_trl

            summary = train_trl(cfg)
        else:
            summary = train(cfg)
    except UserError as e:  # exit code 2, one line naming the file or field
        _leave_process_group()
        fail(str(e))
    except NonFiniteError as e:
        _leave_process_group()
        fail(str(e), code=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, indent=2))
    if (Path(summary["run_dir"]) / "metrics.jsonl").is_file():
        from apo_llm.evaluate import training_report
        from apo_llm.plots import read_metrics

        print(training_report(*read_metrics(Path(summary["run_dir"]) / "metrics.jsonl"), cfg.eval.num_samples))
    return summary


if __name__ == "__main__":
    main()
