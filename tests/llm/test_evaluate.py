"""Evaluator: pass@k bookkeeping, resume, reproducibility and clear errors.

Unit tests use a fake sampler (known completions) with the real reward functions; the
end-to-end tests run the CLI on the tiny model (fixture `tiny_model_dir`).
"""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_llm import evaluate as ev
from apo_llm.options import UserError
from apo_llm.data import Problem

# --------------------------------------------------------------------------------------------
# Fakes
# --------------------------------------------------------------------------------------------


def make_problems(n: int) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i}", f"prompt {i}", str(i)) for i in range(n)]


@dataclass
class FakeSampler:
    """generate_completions stand-in: sample s of prompt 'prompt i' answers '#### i' (correct) for
    s < correct[i], else '#### -1'; greedy is correct when greedy_ok[i]. Records every call."""

    correct: dict
    greedy_ok: dict
    calls: list

    def __call__(self, model, tokenizer, prompts, num_samples, *, max_new_tokens, do_sample=True, seed=None, **kw):
        self.calls.append((list(prompts), num_samples, do_sample, seed))
        texts = []
        for p in prompts:
            i = int(p.split()[-1])
            for s in range(num_samples):
                ok = self.greedy_ok[i] if not do_sample else s < self.correct[i]
                texts.append(f"so #### {i if ok else -1}")
        N = len(texts)
        return SimpleNamespace(texts=texts, prompt_index=[j for j in range(len(prompts)) for _ in range(num_samples)],
                               completion_mask=torch.ones(N, 3, dtype=torch.long),
                               truncated=torch.zeros(N, dtype=torch.bool))


def run_fake(tmp_path, problems, sampler, done=None, **cfg_kw):
    cfg = ev.EvalConfig(out=str(tmp_path), **{"n": 4, "k": "1,2,4", "batch_size": 8, **cfg_kw})
    out_file = tmp_path / ev.PER_PROBLEM_FILE
    done = set() if done is None else done
    wrote = ev.evaluate_model("base", None, None, problems, [p.prompt for p in problems], cfg, "synthetic", done,
                              out_file, generate_fn=sampler)
    return cfg, wrote, ev.read_records(out_file)


# --------------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------------


def test_counts_scored_with_real_rewards(tmp_path):
    problems = make_problems(5)
    correct = {0: 0, 1: 1, 2: 4, 3: 2, 4: 3}
    greedy = {0: False, 1: True, 2: True, 3: False, 4: True}
    sampler = FakeSampler(correct, greedy, [])
    cfg, wrote, recs = run_fake(tmp_path, problems, sampler, save_completions=True)
    assert wrote == 5
    assert [r["c"] for r in recs] == [correct[i] for i in range(5)]
    assert [r["greedy_correct"] for r in recs] == [greedy[i] for i in range(5)]
    assert all(r["n"] == 4 and len(r["completions"]) == 4 for r in recs)
    # batch_size 8 / n 4 = 2 problems per generate call, each followed by its greedy call
    assert [(len(p), n, s) for p, n, s, _ in sampler.calls] == [(2, 4, True), (2, 1, False)] * 2 + [(1, 4, True), (1, 1, False)]
    summary = ev.summarize(recs, [1, 2, 4])["base"]
    assert summary["pass@k"]["1"]["mean"] == pytest.approx(np.mean([correct[i] / 4 for i in range(5)]))
    assert summary["greedy_pass@1"]["mean"] == pytest.approx(3 / 5)
    assert summary["mean@n"]["mean"] == pytest.approx(np.mean([correct[i] / 4 for i in range(5)]))


def test_saved_counts_equal_pass_at_k_from_completions(tmp_path):
    """pass@k from saved (n, c) == pass@k recomputed from the saved completions by re-scoring
    them and enumerating every k-subset of the n samples."""
    from apo_llm.rewards import score_completions

    problems = make_problems(6)
    correct = {0: 0, 1: 1, 2: 2, 3: 3, 4: 5, 5: 6}
    sampler = FakeSampler(correct, {i: False for i in range(6)}, [])
    _, _, recs = run_fake(tmp_path, problems, sampler, n=6, k="1,2,3,6", save_completions=True)
    summary = ev.summarize(recs, [1, 2, 3, 6])["base"]
    for k in (1, 2, 3, 6):
        per_problem = []
        for r in recs:
            ok = [x > 0.5 for x in score_completions("synthetic", r["completions"], [r["gold"]] * r["n"])]
            subsets = list(itertools.combinations(ok, k))
            per_problem.append(sum(any(s) for s in subsets) / len(subsets))
        assert summary["pass@k"][str(k)]["mean"] == pytest.approx(np.mean(per_problem), abs=1e-12)
        assert summary["pass@k"][str(k)]["se"] == pytest.approx(np.std(per_problem, ddof=1) / np.sqrt(6), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8)), min_size=1, max_size=6), st.integers(1, 8))
def test_summary_enumeration_property(nc, k):
    """Any saved (n, c) and k <= min n: pass@k equals the k-subset enumeration average."""
    recs = [{"model": "m", "problem_id": str(i), "n": n, "c": min(c, n)} for i, (n, c) in enumerate(nc)]
    if k > min(n for n, _ in nc):
        with pytest.raises(ValueError, match="k"):
            ev.summarize(recs, [k])
        return
    got = ev.summarize(recs, [k])["m"]["pass@k"][str(k)]["mean"]
    want = []
    for r in recs:
        samples = [True] * r["c"] + [False] * (r["n"] - r["c"])
        subsets = list(itertools.combinations(samples, k))
        want.append(sum(any(s) for s in subsets) / len(subsets))
    assert got == pytest.approx(np.mean(want), abs=1e-12)


def test_resume_skips_done_problems(tmp_path):
    problems = make_problems(5)
    sampler = FakeSampler({i: i % 4 for i in range(5)}, {i: True for i in range(5)}, [])
    run_fake(tmp_path, problems[:3], sampler)
    sampler.calls.clear()
    done = {(r["model"], r["problem_id"]) for r in ev.read_records(tmp_path / ev.PER_PROBLEM_FILE)}
    _, wrote, recs = run_fake(tmp_path, problems, sampler, done=done)
    assert wrote == 2
    sampled = [p for prompts, _, do_sample, _ in sampler.calls if do_sample for p in prompts]
    assert sampled == ["prompt 3", "prompt 4"]
    assert [r["problem_id"] for r in recs] == [f"p{i}" for i in range(5)]


def test_batch_seed_depends_on_batch_only(tmp_path):
    problems = make_problems(4)
    sampler = FakeSampler({i: 1 for i in range(4)}, {i: True for i in range(4)}, [])
    run_fake(tmp_path, problems, sampler, batch_size=4, seed=7)  # one problem per batch
    seeds = [s for _, _, do_sample, s in sampler.calls if do_sample]
    assert seeds == [ev.batch_seed(7, i) for i in range(4)] and len(set(seeds)) == 4
    assert ev.batch_seed(7, 0) != ev.batch_seed(8, 0)


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / ev.PER_PROBLEM_FILE
    good = [{"model": "base", "problem_id": f"p{i}", "n": 4, "c": i} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"model": "base", "problem_id": "p2", "n"')
    with pytest.warns(UserWarning, match="torn"):
        recs = ev.read_records(path)
    assert recs == good
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good)  # ready for appends
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ev.read_records(path) == good


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / ev.PER_PROBLEM_FILE
    rec = {"model": "base", "problem_id": "p0", "n": 4, "c": 1}
    path.write_text(json.dumps(rec))
    assert ev.read_records(path) == [rec]
    assert path.read_text().endswith("\n")


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / ev.PER_PROBLEM_FILE
    rec = json.dumps({"model": "base", "problem_id": "p0", "n": 4, "c": 1})
    path.write_text(rec + "\nnot json\n" + rec + "\n")
    with pytest.raises(ValueError, match="line 2"):
        ev.read_records(path)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="k: pass@16 needs n >= 16"):
        ev.EvalConfig(n=8, k="1,16").validate()
    for bad, field in [(dict(k="1,x"), "k"), (dict(k="0"), "k"), (dict(temperature=0.0), "temperature"),
                       (dict(top_p=1.5), "top_p"), (dict(n=0), "n"), (dict(limit=0), "limit"),
                       (dict(dataset="gsm9k"), "dataset"), (dict(dataset="jsonl"), "dataset"),
                       (dict(adapters=["a"], labels=["x", "y"]), "labels"), (dict(no_base=True), "no_base"),
                       (dict(chat_template="maybe"), "chat_template")]:
        with pytest.raises(ValueError, match=field):
            ev.EvalConfig(**bad).validate()


def test_resume_with_other_settings_is_refused(tmp_path):
    ev.check_run_config(tmp_path, ev.EvalConfig(n=4, k="1,4"))
    ev.check_run_config(tmp_path, ev.EvalConfig(n=4, k="1,2"))  # k is free: only the summary changes
    with pytest.raises(ValueError, match="n: saved 4 vs now 8"):
        ev.check_run_config(tmp_path, ev.EvalConfig(n=8, k="1,4"))


def test_resolve_adapter(tmp_path, monkeypatch):
    direct = tmp_path / "lora"
    direct.mkdir()
    (direct / "adapter_config.json").write_text("{}")
    assert ev.resolve_adapter(str(direct)) == str(direct)
    run = tmp_path / "run"  # a training output dir: checkpoints plus the final adapter/
    for sub in ("checkpoints/step_10/adapter", "adapter"):
        (run / sub).mkdir(parents=True)
        (run / sub / "adapter_config.json").write_text("{}")
    assert ev.resolve_adapter(str(run)) == str(run / "adapter")
    nested = tmp_path / "nested"
    (nested / "final").mkdir(parents=True)
    (nested / "final" / "adapter_config.json").write_text("{}")
    assert ev.resolve_adapter(str(nested)) == str(nested / "final")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="adapters: .*without adapter_config.json"):
        ev.resolve_adapter(str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        ev.resolve_adapter(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        ev.resolve_adapter("someone/some-adapter")


def test_labels():
    assert ev.adapter_labels(["runs/grpo/", "x/apo"], []) == ["grpo", "apo"]
    assert ev.adapter_labels(["a/run", "b/run"], []) == ["run", "run_1"]
    assert ev.adapter_labels(["a/base"], []) == ["base_adapter"]
    with pytest.raises(ValueError, match="labels"):
        ev.adapter_labels(["a", "b"], ["x", "x"])


def test_missing_adapter_fails_before_loading_anything(tmp_path, monkeypatch):
    import apo_llm.modeling

    def boom(*a, **k):
        raise AssertionError("model loaded before the adapter was checked")

    monkeypatch.setattr(apo_llm.modeling, "load_model_and_tokenizer", boom)
    with pytest.raises(ValueError, match="adapters: .*does not exist"):
        ev.main(["--adapters", str(tmp_path / "nope"), "--n", "2", "--k", "1,2", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_missing_model_fails_early(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="model: .*not a local model directory"):
        ev.main(["--model", str(tmp_path / "nope"), "--n", "2", "--k", "1", "--out", str(tmp_path / "o")])
    from apo_llm.topk_coverage import main as coverage_main

    with pytest.raises(ValueError, match="model: .*HF_HUB_OFFLINE"):
        coverage_main(["--model", "Qwen/Qwen2.5-Math-7B", "--limit", "2", "--out", str(tmp_path / "c")])
    ev.check_model_spec(str(tmp_path))  # an existing directory passes


def test_command_line_lists_bools_and_old_spellings(monkeypatch, capsys):
    """main() parses through apo_llm.options: list fields take several tokens or a comma list,
    bare bools mean true, the old dash spellings still work (one deprecation line each)."""
    seen = []
    monkeypatch.setattr(ev, "run_eval", lambda cfg: seen.append(cfg) or {})
    ev.main(["--adapters", "a", "b", "--labels", "x,y", "--no_base", "--max-new-tokens", "9", "--summary-only"])
    cfg = seen[-1]
    assert (cfg.adapters, cfg.labels, cfg.no_base, cfg.max_new_tokens, cfg.summary_only) == (["a", "b"], ["x", "y"],
                                                                                             True, 9, True)
    assert cfg.n == ev.EvalConfig().n and cfg.k == "1,4,16"  # the rest at their defaults
    assert [ln.split(" is ")[0] for ln in capsys.readouterr().err.splitlines()] == [
        "warning: --max-new-tokens", "warning: --summary-only"]
    with pytest.raises(UserError, match=r"^temprature: unknown option; choose from \[.*'temperature'"):
        ev.main(["--temprature", "0.5"])
    assert len(seen) == 1  # nothing ran


def test_k_larger_than_n_fails(tmp_path):
    with pytest.raises(ValueError, match="k: pass@16 needs n >= 16"):
        ev.main(["--n", "4", "--k", "1,16", "--out", str(tmp_path / "o")])


def test_empty_dataset_fails(tmp_path, monkeypatch):
    import apo_llm.modeling

    monkeypatch.setattr(apo_llm.modeling, "load_model_and_tokenizer", lambda *a, **k: 1 / 0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="needs --reward"):  # the reward is explicit for local files
        ev.main(["--dataset", f"jsonl:{empty}", "--n", "2", "--k", "1", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="no valid problems|no problems"):
        ev.main(["--dataset", f"jsonl:{empty}", "--n", "2", "--k", "1", "--out", str(tmp_path / "o"),
                 "--reward", "math"])
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="no valid problems|no problems"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev.main(["--dataset", f"jsonl:{junk}", "--n", "2", "--k", "1", "--out", str(tmp_path / "o"),
                 "--reward", "gsm8k_strict"])
    with pytest.raises(ValueError, match="does not exist"):
        ev.main(["--dataset", f"jsonl:{tmp_path / 'missing.jsonl'}", "--n", "2", "--k", "1",
                 "--out", str(tmp_path / "o")])


def test_markdown_and_plot(tmp_path):
    recs = [{"model": m, "problem_id": str(i), "n": 4, "c": (i + j) % 5, "greedy_correct": i % 2 == 0,
             "mean_reward": ((i + j) % 5) / 4} for j, m in enumerate(["base", "apo"]) for i in range(4)]
    summary = ev.summarize(recs, [1, 2, 4])
    table = ev.markdown_table(summary, [1, 2, 4])
    assert table.splitlines()[0].startswith("| model | problems | greedy pass@1 | mean@n | pass@1 | pass@2 | pass@4")
    assert len(table.splitlines()) == 4 and "| apo | 4 |" in table
    ev.plot_pass_at_k(summary, [1, 2, 4], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_paired_deltas_against_direct_differences():
    recs = []
    rng = np.random.default_rng(0)
    cs = {m: rng.integers(0, 5, size=5) for m in ("base", "grpo", "apo")}
    for m, c in cs.items():
        recs += [{"model": m, "problem_id": f"p{i}", "n": 4, "c": int(c[i])} for i in range(5 if m != "apo" else 4)]
    d = ev.paired_deltas(recs, [1, 4], "base", ["base", "grpo", "apo"])
    assert set(d) == {"grpo", "apo"} and d["apo"]["problems"] == 4
    from apo_llm.metrics import pass_at_k

    for m, P in (("grpo", 5), ("apo", 4)):
        for k in (1, 4):
            diff = [pass_at_k(4, int(cs[m][i]), k) - pass_at_k(4, int(cs["base"][i]), k) for i in range(P)]
            assert d[m]["pass@k"][str(k)]["mean"] == pytest.approx(np.mean(diff), abs=1e-12)
            assert d[m]["pass@k"][str(k)]["se"] == pytest.approx(np.std(diff, ddof=1) / np.sqrt(P), abs=1e-12)
    assert "| apo - base | 4 |" in ev.markdown_deltas(d, [1, 4])


# --------------------------------------------------------------------------------------------
# End to end on the tiny model
# --------------------------------------------------------------------------------------------


def cli(model_dir, out, *extra, limit=3):
    return ["--model", str(model_dir), "--dataset", "synthetic", "--n", "4", "--k", "1,2,4", "--max_new_tokens", "48",
            "--limit", str(limit), "--batch_size", "8", "--seed", "3", "--out", str(out), "--save_completions", *extra]


def test_tiny_model_reproducible_and_rescored(tiny_model_dir, one_thread, tmp_path):
    """Same seed -> identical per-problem records; saved (n, c) agree with re-scored completions."""
    from apo_llm.rewards import score_completions

    a = ev.main(cli(tiny_model_dir, tmp_path / "a"))
    ev.main(cli(tiny_model_dir, tmp_path / "b"))
    ra = ev.read_records(tmp_path / "a" / ev.PER_PROBLEM_FILE)
    rb = ev.read_records(tmp_path / "b" / ev.PER_PROBLEM_FILE)
    assert len(ra) == 3 and ra == rb
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"per_problem.jsonl", "summary.json", "pass_at_k.png"}
    assert json.loads((tmp_path / "a" / ev.SUMMARY_FILE).read_text())["models"] == a["models"]
    for r in ra:
        rewards = score_completions("synthetic", r["completions"], [r["gold"]] * r["n"])
        assert r["c"] == sum(x > 0.5 for x in rewards)
        assert r["greedy_correct"] == (score_completions("synthetic", [r["greedy_completion"]], [r["gold"]])[0] > 0.5)
    # a different seed draws other samples
    ev.main(cli(tiny_model_dir, tmp_path / "c", "--seed", "4"))
    rc = ev.read_records(tmp_path / "c" / ev.PER_PROBLEM_FILE)
    assert [r["completions"] for r in rc] != [r["completions"] for r in ra]
    # greedy does not depend on the seed
    assert [r["greedy_completion"] for r in rc] == [r["greedy_completion"] for r in ra]


def test_tiny_model_resume_equals_fresh_run(tiny_model_dir, one_thread, tmp_path, monkeypatch):
    """Interrupted after 2 problems (torn last line), resumed to 4: only the missing problems are
    sampled, and the result equals a fresh 4-problem run."""
    import apo_llm.rollout

    ev.main(cli(tiny_model_dir, tmp_path / "r", limit=2))
    path = tmp_path / "r" / ev.PER_PROBLEM_FILE
    with open(path, "a") as fh:
        fh.write('{"model": "base", "problem_id": "synthetic-te')  # killed mid-write
    real = apo_llm.rollout.generate_completions
    seen = []

    def counting(model, tokenizer, prompts, *a, **k):
        seen.extend(prompts if k.get("do_sample", True) else [])
        return real(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(apo_llm.rollout, "generate_completions", counting)
    with pytest.warns(UserWarning, match="torn"):
        resumed = ev.main(cli(tiny_model_dir, tmp_path / "r", limit=4))
    assert len(seen) == 2
    again = ev.main(cli(tiny_model_dir, tmp_path / "r", limit=4))  # nothing left to do
    assert len(seen) == 2 and again["models"] == resumed["models"]
    fresh = ev.main(cli(tiny_model_dir, tmp_path / "f", limit=4))
    assert ev.read_records(path) == ev.read_records(tmp_path / "f" / ev.PER_PROBLEM_FILE)
    assert resumed["models"] == fresh["models"]
    with pytest.raises(ValueError, match="n: saved 4 vs now 8"):
        ev.main(cli(tiny_model_dir, tmp_path / "r", "--n", "8", limit=4))


def test_tiny_model_base_and_adapter_side_by_side(tiny_model_dir, one_thread, tmp_path):
    """A training-output-style dir with a LoRA adapter: 'base' equals the base model alone
    (adapter disabled), the adapter is evaluated under its label and differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    peft_model.save_pretrained(tmp_path / "run_apo" / "adapter")

    alone = ev.main(cli(tiny_model_dir, tmp_path / "alone", limit=2))
    both = ev.main(cli(tiny_model_dir, tmp_path / "both", "--adapters", str(tmp_path / "run_apo"),
                       "--labels", "apo", limit=2))
    assert list(both["models"]) == ["base", "apo"]
    recs = ev.read_records(tmp_path / "both" / ev.PER_PROBLEM_FILE)
    base = [r for r in recs if r["model"] == "base"]
    apo = [r for r in recs if r["model"] == "apo"]
    assert base == ev.read_records(tmp_path / "alone" / ev.PER_PROBLEM_FILE)
    assert both["models"]["base"] == alone["models"]["base"]
    assert [r["completions"] for r in apo] != [r["completions"] for r in base]
    assert set(both["paired_deltas"]) == {"apo"}
    # an adapter trained on another base model is flagged
    cfg_path = tmp_path / "run_apo" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="trained on 'someone/other-model'"):
        ev.load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [str(cfg_path.parent)], ["apo"],
                         str(tiny_model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ev.load_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [str(cfg_path.parent)], ["apo"],
                         "someone/other-model")
    # --summary_only recomputes other k from the saved counts without sampling
    only = ev.main(["--summary_only", "--out", str(tmp_path / "both"), "--n", "4", "--k", "1,3"])
    assert set(only["models"]["apo"]["pass@k"]) == {"1", "3"}
