"""What a run records about itself and what a resume may change.

`save_resolved` writes config.yaml (the resolved config, loadable with --config) and run_info.json
(seed, library versions, git SHA, argv, the APO reading); `resume_differences` compares a
checkpoint's saved config with the resumed run's: loop settings in APPLIED_ON_RESUME are applied,
any other difference is refused (both engines call it).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Optional

import yaml


def save_resolved(cfg, out_dir: str | Path, extra: Optional[dict] = None) -> None:
    """config.yaml (resolved, loadable with --config) and run_info.json (seed, versions, git SHA)."""
    from apo_llm.modeling import git_sha

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    from importlib import metadata

    # distribution metadata, not module.__version__: math_verify has no __version__ attribute
    for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                      ("accelerate", "accelerate"), ("datasets", "datasets"), ("math_verify", "math-verify"),
                      ("numpy", "numpy"), ("trl", "trl")):
        try:
            versions[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[mod] = None
    info = {"seed": cfg.train.seed, "versions": versions, "git_sha": git_sha(Path(__file__).parent),
            "argv": sys.argv, "loss_reading": loss_reading(cfg), **(extra or {})}
    (out / "run_info.json").write_text(json.dumps(info, indent=2, default=str))


def loss_reading(cfg) -> dict:
    """The APO reading this run trains with (docs/method.md): r_anchor's normaliser, the clip, and the
    effective pull cap (1 + eps_high when loss.apo_pull_cap is None; "inf" for no cap)."""
    lc = cfg.loss
    cap = lc.pull_cap
    return {"name": lc.name, "apo_anchor_norm": lc.apo_anchor_norm, "apo_clip": lc.apo_clip,
            "apo_anchoring": lc.apo_anchoring, "apo_pull_cap": cap if math.isfinite(cap) else str(cap),
            "needs_anchor_old_logp": lc.needs_anchor_old}


# Settings a resume may change: they steer the loop, not what a step computes. Any other difference
# from the checkpoint's config is refused (a resumed run keeps the settings it was started with).
APPLIED_ON_RESUME = frozenset({
    "train.steps", "train.stop_at_step", "train.num_threads", "train.max_consecutive_nonfinite",
    "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.allow_changed_inputs",
    "logging.progress", "logging.plots",
    "logging.tensorboard", "logging.overwrite", "eval.every", "model.device"})


def resume_differences(saved: dict, cfg) -> tuple[dict, dict]:
    """(applied, refused): {"section.field": (saved value, new value)} between a checkpoint's config
    and this run's. Fields present on one side only (other versions) are not compared."""
    applied, refused = {}, {}
    for section, values in cfg.to_dict().items():
        old = saved.get(section, {})
        for key, new in values.items():
            if key in old and old[key] != new:
                name = f"{section}.{key}"
                (applied if name in APPLIED_ON_RESUME else refused)[name] = (old[key], new)
    return applied, refused
