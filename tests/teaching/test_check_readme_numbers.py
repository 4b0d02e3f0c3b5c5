"""scripts/check_readme_numbers.py's parsing and diffing on small fixtures (the commands it reruns are
not run here): a quoted number passes, a changed one is reported with the docs' nearest line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_readme_numbers", ROOT / "scripts" / "check_readme_numbers.py")
crn = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = crn  # dataclasses look their module up there
_spec.loader.exec_module(crn)

DEMO_STDOUT = """{
  "steps": 30,
  "finished": true
}
training reward (mean of the first vs last 5 steps ± s.e. over steps): 0.281 ± 0.020 -> 0.300 ± 0.015, change +0.019 ± 0.025: within noise
held-out (64 problems x 8 samples, ± s.e. over problems), step 0 -> 30:
  pass@1: 0.238 ± 0.030 -> 0.254 ± 0.031, paired change +0.016 ± 0.012: within noise
  pass@4: 0.548 ± 0.040 -> 0.593 ± 0.040, paired change +0.045 ± 0.020: up
"""

TABLE_MD = """| method | pass@1 | pass@256 | pass@1024 | crossover_k | frac_prompts_below_base | coverage | distinct@256 |
|---|---|---|---|---|---|---|---|
| base (reference) | 0.368 ± 0.089 | 0.868 ± 0.068 | 0.960 ± 0.038 | none | 0.000 ± 0.000 | 1.000 ± 0.000 | 3.1 ± 0.2 |
| grpo | 0.429 ± 0.106 | 0.729 ± 0.111 | 0.776 ± 0.103 | 8 (5/5 seeds) | 0.472 ± 0.050 | 0.369 ± 0.020 | 1.5 ± 0.1 |
"""

README = """Some text. `make test-fast` runs 600 formula tests in 21 s.
```
training reward (mean of the first vs last 5 steps ± s.e. over steps): 0.281 ± 0.020 -> 0.300 ± 0.015, change +0.019 ± 0.025: within noise
held-out (64 problems x 8 samples, ± s.e. over problems), step 0 -> 30:
  pass@1: 0.238 ± 0.030 -> 0.254 ± 0.031, paired change +0.016 ± 0.012: within noise
  pass@4: 0.548 ± 0.040 -> 0.593 ± 0.040, paired change +0.045 ± 0.020: up
```
| method | pass@1 | pass@256 | pass@1024 | k* | prompts below base | coverage | train/pass@1 |
|---|---|---|---|---|---|---|---|
| base (reference) | 0.368 ± 0.089 | 0.868 ± 0.068 | 0.960 ± 0.038 | none | 0 | 1.000 | 0.386 |
| grpo | 0.429 ± 0.106 | 0.729 ± 0.111 | 0.776 ± 0.103 | 8 (5/5) | 0.472 | 0.369 | 0.878 |
"""


def test_everything_quoted_passes():
    got = {"demo": DEMO_STDOUT, "sim": TABLE_MD, "tests": "....\n600 passed, 2 deselected in 20.1s\n"}
    assert crn.check(got, README.splitlines()) == []


def test_demo_summary_starts_at_the_reward_line():
    lines = crn.demo_summary(DEMO_STDOUT)
    assert len(lines) == 4 and lines[0].startswith("training reward") and "pass@4" in lines[-1]


def test_a_changed_demo_number_is_stale_with_its_nearest_line():
    rerun = DEMO_STDOUT.replace("0.238 ± 0.030 -> 0.254", "0.262 ± 0.030 -> 0.254")
    bad = crn.check({"demo": rerun}, README.splitlines())
    assert len(bad) == 1 and bad[0][0] == "demo" and "0.262" in bad[0][1] and "0.238" in bad[0][2]


def test_a_changed_simulator_cell_is_stale():
    rerun = TABLE_MD.replace("0.729 ± 0.111", "0.731 ± 0.111")
    bad = crn.check({"sim": rerun}, README.splitlines())
    assert [b[1].split(":")[0] for b in bad] == ["grpo"] and "0.729 ± 0.111" in bad[0][2]
    rerun = TABLE_MD.replace("| 0.369 ± 0.020 |", "| 0.370 ± 0.020 |")  # the coverage mean counts too
    assert len(crn.check({"sim": rerun}, README.splitlines())) == 1


def test_a_changed_test_count_is_stale():
    bad = crn.check({"tests": "609 passed, 200 deselected in 30s"}, README.splitlines())
    assert bad == [("tests", "make test-fast: 609 tests", "Some text. `make test-fast` runs 600 formula tests in 21 s.")]
    with pytest.raises(ValueError, match="passed"):
        crn.passed_count("collected 0 items")


def test_the_script_fails_on_stale_numbers(tmp_path, capsys):
    """main() with saved outputs (nothing rerun): exit code 1 and a STALE line; 0 once the docs agree."""
    (tmp_path / "demo.txt").write_text(DEMO_STDOUT.replace("+0.045", "+0.046"))
    doc = tmp_path / "README.md"
    doc.write_text(README)
    assert crn.main(["--only", "demo", "--outputs", str(tmp_path), "--docs", str(doc)]) == 1
    assert "STALE [demo]" in capsys.readouterr().out
    doc.write_text(README.replace("+0.045", "+0.046"))
    assert crn.main(["--only", "demo", "--outputs", str(tmp_path), "--docs", str(doc)]) == 0
