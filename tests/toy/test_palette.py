"""apo_toy.palette: one look per arm, distinct within every arm list a figure, preset or lesson draws."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from apo_toy import PRESETS, palette


def _names(methods) -> list[str]:
    return ["base"] + [m if isinstance(m, str) else m.name for m in methods]


def _figure_arm_lists() -> dict[str, list[str]]:
    """Every arm list a preset, a paper figure or a lesson draws together."""
    from apo_llm import miniature
    from paper_figures import sim

    lists = {f"preset {n}": _names(p.methods) for n, p in PRESETS.items()}
    lists.update({f"preset {n} curves": _names(p.curve_arms) for n, p in PRESETS.items() if p.curve_arms})
    lists["sim.rsc"] = _names(sim.rsc_methods())
    lists["sim.quick_frontier"] = _names(sim.QUICK_FRONTIER_ARMS)
    lists["sim.ablation"] = ["base", "grpo", "apo", "apo_push_only", "apo_inclusive", "apo@K=2", "apo@K=4"]
    lists["llm_miniature"] = _names(miniature.ARMS)
    from apo_toy import teaching

    lists.update({f"lesson {k}": _names(v) for k, v in teaching.FIGURE_ARMS.items()})
    return lists


def test_every_figure_arm_list_is_distinct():
    for where, names in _figure_arm_lists().items():
        looks = {n: palette.style(n) for n in dict.fromkeys(names)}
        keys = [(s["color"], str(s["linestyle"]), s["marker"]) for s in looks.values()]
        dup = [n for n, k in zip(looks, keys) if keys.count(k) > 1]
        assert not dup, f"{where}: arms {dup} share a look"


def test_family_defaults_pairwise_distinct_and_variants_keep_the_colour():
    keys = {(c, str(ls), mk) for c, ls, mk in palette.FAMILIES.values()}
    assert len(keys) == len(palette.FAMILIES)
    assert palette.color("apo_old_mass@beta=0.1") == palette.color("apo_old_mass") != palette.color("apo")
    assert palette.color("grpo_kl_0.1") == palette.color("grpo_kl") == palette.color("grpo_kl@0.05")
    assert palette.family("grpo@lr_x0.5") == "grpo_low_lr" and palette.family("apo_ref") == "apo"
    assert palette.family("grpo_kl_full@0.5") == "grpo_kl_full" and palette.family("kl_on_wrong") == "kl_on_wrong"
    assert palette.family("apo@beta=1.0 (positive-only, not APO)") == "apo"
    assert palette.style("apo@beta=0.1") != palette.style("apo")            # a variant has its own stroke
    assert palette.style("psr") != palette.style("nsr") and palette.color("psr") == palette.color("nsr")
    assert palette.color("something_new") == palette.UNKNOWN[0]


def test_style_is_a_pure_function_of_the_name():
    assert palette.style("apo@beta=0.2") == palette.style("apo@beta=0.2")
    assert palette.styles(["grpo", "apo@beta=0.2"])["apo@beta=0.2"] == palette.style("apo@beta=0.2")


def test_styles_resolves_a_forced_collision():
    names = ["apo", "apo_tiny", "apo-tiny"]                # aliases: the same look by style()
    assert not palette.distinct(names)
    assert palette.distinct(names, resolve=True)
    looks = palette.styles(names)
    assert len({looks[n]["color"] for n in names}) == 1     # the family colour is kept


STRENGTHS = [0.001, 0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(palette.FAMILIES)), st.sampled_from(STRENGTHS + [None]),
                          st.sampled_from(["beta=", "", "kl="])), min_size=1, max_size=25))
def test_styles_distinct_for_any_arm_list(arms):
    names = [f if v is None else f"{f}@{key}{v}" for f, v, key in arms]
    looks = palette.styles(names)
    keys = [(s["color"], str(s["linestyle"]), s["marker"]) for s in looks.values()]
    assert len(set(keys)) == len(looks)
    for n in looks:                                          # resolving never changes an arm's colour
        assert looks[n]["color"] == palette.color(n)


def test_one_sweep_of_strengths_is_distinct_by_style_alone():
    for fam in ("apo", "grpo_kl", "apo_old_token", "entropy"):
        for sweep in ((0.05, 0.1, 0.2), (0.01, 0.05, 0.2, 0.5), (0.003, 0.01, 0.03), (0.02, 0.1, 0.5)):
            assert palette.distinct([fam] + [f"{fam}@beta={b}" for b in sweep]), (fam, sweep)


def test_run_plots_draw_each_arm_in_its_palette_look(tmp_path, monkeypatch):
    """runs/<preset>/curves.png and pass_at_k.png: every arm's line has the palette's colour and marker."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from apo_toy import SimConfig, SuiteSpec, plots, run_methods

    arms = ["grpo", "apo", "grpo_kl"]
    table = run_methods(SuiteSpec(n_prompts=2, depth=2), arms, SimConfig(steps=2, eval_every=1))
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plots.plot_curves(table, tmp_path, "t")
    plots.plot_pass_at_k(table, tmp_path, "t")
    assert len(figs) == 2
    for fig in figs:
        drawn = {ln.get_label(): ln for ax in fig.axes[:1] for ln in ax.get_lines()}
        for m in arms:
            want = palette.styles(["base"] + arms)[m]
            assert to_hex(drawn[m].get_color()) == want["color"].lower() and drawn[m].get_marker() == want["marker"]


def test_library_code_never_sets_the_matplotlib_backend():
    """Only command-line entry points (`if __name__ == "__main__":` blocks, __main__.py) may call it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for pkg in ("apo_llm", "apo_toy", "paper_figures", "notebooks"):
        for path in (root / pkg).rglob("*.py"):
            text = path.read_text()
            if "matplotlib.use(" not in text or path.name == "__main__.py":
                continue
            head = text.split('if __name__ == "__main__":')[0]
            assert "matplotlib.use(" not in head, f"{path.relative_to(root)} sets the backend outside its entry point"
