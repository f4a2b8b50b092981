"""benchmarks/reproduce/claims.py (``python benchmarks/claims.py``): the statistics against scipy's own tests,
the verdicts on constructed gains, and a smoke grid (1 epoch of 32 samples, 2 denoising steps, 1 image per
prompt, on the bundled model) through records, report, skip, resume, refusal and publish / import.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from .test_reproduce import reproduce  # noqa: F401  (loads the package from benchmarks/: it is not installed)

claims = importlib.import_module("reproduce.claims")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_examples_in_the_module_run() -> None:
    result = doctest.testmod(claims, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_intervals_match_scipys_t_tests() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 0.1, 5), rng.normal(0.1, 0.3, 6)
    mean, low, high = claims.mean_interval(a)
    ci = stats.ttest_1samp(a, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(a.mean()) and (low, high) == pytest.approx((ci.low, ci.high))
    diff, low, high = claims.difference_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(a.mean() - b.mean()) and (low, high) == pytest.approx((ci.low, ci.high))
    assert math.isnan(claims.mean_interval([0.2])[1])  # one seed: no interval


def _index(gains: dict[tuple[str, str], list[float]], captioner_gain: float = 0.0) -> dict:
    """Records whose judge score on every set rises by the cell's gain per seed (from 0.5)."""
    runs = {}
    for (task, method), values in gains.items():
        for seed, gain in enumerate(values):
            before = {s: {"judge": 0.5, "captioner": 0.5} for s in claims.SETS}
            after = {s: {"judge": 0.5 + gain, "captioner": 0.5 + gain + captioner_gain} for s in claims.SETS}
            runs[f"{task}-{method}-s{seed}"] = {"task": task, "method": method, "seed": seed, "before": before,
                                                "after": after}  # fmt: skip
    return {"budget": {}, "runs": runs}


def test_verdicts_follow_the_intervals() -> None:
    up, flat, down = [0.20, 0.25, 0.30, 0.22, 0.28], [0.02, -0.03, 0.01, -0.02, 0.0], [-0.2, -0.25, -0.3, -0.22, -0.28]
    index = _index(
        {("counting", "ddpo_is"): up, ("counting", "rwr"): down, ("counting", "ddpo_sf"): up,
         ("captioner", "ddpo_is"): flat},
        captioner_gain=0.1,
    )  # fmt: skip
    decided = {c.claim: claims.decide(index, c) for c in claims.CLAIM_LIST}
    assert decided["DDPO beats RWR"]["verdict"] == "held"
    assert decided["DDPO beats RWR"]["effect"] == pytest.approx(np.mean(up) - np.mean(down))
    assert decided["DDPO-IS beats DDPO-SF per reward query"]["verdict"] == "not held"  # equal gains
    assert decided["RL improves prompt alignment (VLM feedback)"]["verdict"] == "not held"  # flat
    assert decided["RL improves prompt alignment (judge reward)"]["verdict"] == "held"
    # The captioner rises 0.1 more than the judge in every seed (paired: zero spread): trained on the judge, the
    # trained reward gains less than the evaluator (reversed); trained on the captioner, more (held).
    assert decided["Over-optimisation"]["effect"] == pytest.approx(-0.1)
    assert decided["Over-optimisation"]["verdict"] == "reversed"
    assert decided["Over-optimisation (captioner reward)"]["effect"] == pytest.approx(0.1)
    assert decided["Over-optimisation (captioner reward)"]["verdict"] == "held"
    reversed_index = _index({("counting", "ddpo_is"): down, ("counting", "rwr"): up})
    assert claims.decide(reversed_index, claims.CLAIM_LIST[0])["verdict"] == "reversed"
    assert claims.decide(reversed_index, claims.CLAIM_LIST[2])["verdict"] == "not run"  # no captioner runs
    table = claims.claims_table(index)
    assert "| DDPO beats RWR |" in table and "**held**" in table


def test_compare_puts_each_cell_against_the_other_grids_same_task(tmp_path: Path) -> None:
    up, flat = [0.20, 0.25, 0.30, 0.22, 0.28], [0.02, -0.03, 0.01, -0.02, 0.0]
    a = _index({("counting", "ddpo_sf"): flat})
    b = _index({("counting", "ddpo_is"): up, ("counting", "ddpo_sf"): flat, ("captioner", "ddpo_is"): up})
    for index, wall in ((a, 60.0), (b, 120.0)):
        for record in index["runs"].values():
            record["wall_s"] = wall
    rows = claims.compare_table(a, b, "A", "B").splitlines()[2:]
    assert len(rows) == 2 * len(claims.SETS)  # SF against IS and SF of the judge reward; no captioner row
    against_is = [r for r in rows if "| DDPO-IS |" in r]
    assert all("B gains more" in r and "| 0.50 |" in r for r in against_is)
    assert f"{100 * (np.mean(flat) - np.mean(up)):+.1f}" in against_is[0]
    assert all("no difference shown" in r for r in rows if "| DDPO-SF |" in r)
    with pytest.raises(SystemExit, match=r"results\.json does not exist"):
        claims.read_index(tmp_path)


def test_runs_are_taken_only_where_they_ran_with_their_cells_settings(tmp_path: Path) -> None:
    from dataclasses import asdict, replace

    def publish(folder: Path, budget: claims.ClaimsBudget, runs: dict) -> Path:
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"budget": asdict(budget), "runs": runs}))
        return folder

    index = _index({("counting", "ddpo_is"): [0.1], ("counting", "ddpo_sf"): [0.1]})["runs"]
    # Records without settings ran with the cells of their time: DDPO-SF at the preset's lr (1e-4).
    old = publish(tmp_path / "old", claims.CLAIMS, index)
    at_1e5 = replace(claims.CLAIMS, mode="sf-lr1e-5", overrides=(("learning_rate", "1e-5"),))
    relabelled = publish(tmp_path / "sf", at_1e5, {"counting-ddpo_sf-s0": index["counting-ddpo_sf-s0"]})
    out = tmp_path / "out"
    assert claims.import_published(old, out, claims.CLAIMS) == 1  # DDPO-IS only
    assert not (out / "runs" / "counting-ddpo_sf-s0").exists()
    assert claims.import_published(relabelled, out, claims.CLAIMS) == 1  # the same settings under another label
    taken = json.loads((out / "runs" / "counting-ddpo_sf-s0" / "record.json").read_text())
    assert taken["settings"] == claims.run_settings("ddpo_sf", ())
    # A finished run whose settings differ from its cell's is refused, naming the folder to delete.
    (out / "runs" / "counting-ddpo_sf-s0" / "record.json").write_text(json.dumps({**taken, "settings": {"x": "1"}}))
    with pytest.raises(SystemExit, match=r"counting-ddpo_sf-s0 ran with other settings.*x 1 → \(unset\).*delete"):
        claims.collect(out, replace(claims.CLAIMS, seeds=(0,)))
    with pytest.raises(SystemExit, match="per-run budget"):
        claims.import_published(publish(tmp_path / "short", replace(claims.CLAIMS, num_epochs=2), index), out,
                                claims.CLAIMS)  # fmt: skip


def smoke(out: Path, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--jobs", "1", "--threads", "1", "--label", "smoke",
        "--cells", "counting:ddpo_is", "captioner:ddpo_is", "--seeds", "0", "1",
        "--epochs", "1", "--samples-per-epoch", "32", "--per-prompt", "1", "--num-steps", "2", *extra,
    ]  # fmt: skip


def test_smoke_grid_records_report_resume_refuse_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "claims"
    # A run killed after training, before its measurement, resumes without training again.
    real_measure = claims.measure
    calls = {"n": 0}

    def measure_then_die(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:  # 1: the base model of seed 0, 2: the first run after training
            raise KeyboardInterrupt
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(claims, "measure", measure_then_die)
    with pytest.raises(KeyboardInterrupt):
        claims.main(smoke(out))
    monkeypatch.undo()
    first = out / "runs" / "counting-ddpo_is-s0"
    assert (first / "checkpoints" / "last.pt").is_file() and not (first / "record.json").exists()

    index = claims.main(smoke(out))
    assert sorted(index["runs"]) == [
        "captioner-ddpo_is-s0", "captioner-ddpo_is-s1", "counting-ddpo_is-s0", "counting-ddpo_is-s1"
    ]  # fmt: skip
    assert len((first / "metrics.jsonl").read_text().splitlines()) == 1  # its epoch trained once
    for record in index["runs"].values():
        assert record["queries"] == 32 and len(record["curve"]) == 1 and record["cpu"] == claims.cpu_model()
        assert record["settings"] == claims.run_settings("ddpo_is", [])
        assert set(record["before"]) == set(claims.SETS) == set(record["after"])
        assert record["before"][claims.RL_TRAIN]["n"] == 12  # 1 image of each of the 12 RL prompts
    # The cells of a seed share its base measurement (the same model on the same noise); seeds differ in noise.
    runs = index["runs"]
    assert runs["counting-ddpo_is-s0"]["before"] == runs["captioner-ddpo_is-s0"]["before"]
    report = (out / "claims.md").read_text()
    assert "| RL improves prompt alignment (judge reward) |" in report and "| DDPO beats RWR | " in report
    assert (out / "claims.png").stat().st_size > 1000 and (out / "samples.png").stat().st_size > 1000

    # Finished runs are skipped; another per-run budget in the same folder is refused before any work.
    monkeypatch.setattr(claims, "execute_run", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert claims.main(smoke(out))["runs"] == runs
    with pytest.raises(SystemExit, match="different per-run budget"):
        claims.main(smoke(out, "--epochs", "2"))
    # A changed per-run budget without a label is refused too.
    with pytest.raises(SystemExit, match="needs --label"):
        claims.budget_from_args(claims.parse_args(["--epochs", "2"]))

    # Publish, then a fresh checkout rebuilds the same tables from the published records alone.
    docs = tmp_path / "docs"
    claims.main([*smoke(out), "--report-only", "--publish", str(docs)])
    published = json.loads((docs / "smoke" / "results.json").read_text())
    assert published["runs"].keys() == runs.keys()
    fresh = tmp_path / "fresh"
    rebuilt = claims.main([*smoke(fresh), "--import", str(docs / "smoke"), "--report-only"])
    assert all(r["imported_from"] == str(docs / "smoke") for r in rebuilt["runs"].values())
    assert claims.claims_table(rebuilt) == claims.claims_table(published)
    assert claims.cells_table(rebuilt) == claims.cells_table(published)


def test_the_full_grid_is_five_seeds_of_four_cells() -> None:
    assert len(claims.CLAIMS.runs()) == 20 and claims.CLAIMS.seeds == (0, 1, 2, 3, 4)
    # The quick runs are runs of the full grid (same per-run budget), so the full grid reuses them.
    assert set(claims.QUICK.runs()) <= set(claims.CLAIMS.runs())
    assert claims.QUICK.per_run() == claims.CLAIMS.per_run()
