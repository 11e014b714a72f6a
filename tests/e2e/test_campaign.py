"""The fault campaign in CI (tests/campaign/, README.md there): a short
campaign with a fixed seed, plus every run listed in
tests/campaign/regressions.json (each one a violation found once), each run
checked by the three oracles: one running copy at a time, the guest's own
checkers (and nothing acked lost), and a client that never sees a fork or a
regression.  Asserts zero violations and zero harness errors.

About 20 s per run on a quiet 2-core box.  REMUS_CAMPAIGN_CI_RUNS sets how
many fixed-seed runs (default 4).  Results go to the test's temp dir, not to
tests/campaign/results/runs.jsonl (that file is the long-run record).
"""

import json
import os
import sys
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).resolve().parents[1] / "campaign"
CI_SEED = "ci-1"


def _campaign():
    sys.path.insert(0, str(CAMPAIGN))
    import campaign
    return campaign


def _runs():
    """{seed: ([run, ...], {run: option overrides})}: the fixed-seed runs and
    every regression (an entry may pin options, e.g. "proxy": false for a run
    found before the link proxy existed)."""
    n = int(os.environ.get("REMUS_CAMPAIGN_CI_RUNS", "4"))
    runs = {CI_SEED: (list(range(n)), {})}
    for r in json.loads((CAMPAIGN / "regressions.json").read_text()):
        idx, over = runs.setdefault(str(r["seed"]), ([], {}))
        idx.append(int(r["run"]))
        if "proxy" in r:
            over[int(r["run"])] = {"proxy": bool(r["proxy"])}
    return runs


def test_fault_campaign_fixed_seed_and_regressions(tmp_path, request):
    campaign = _campaign()
    # conftest skips what misses requirements; the campaign fails instead
    # (its runs are the arbitration's safety evidence).
    why = campaign.requirements_missing()
    if why:
        pytest.fail(why, pytrace=False)
    opts = campaign.default_opts(work_dir=str(tmp_path / "work"), no_keep=False)
    results = tmp_path / "runs.jsonl"
    records = []
    for seed, (idx, over) in _runs().items():
        records += campaign.run_campaign(seed, sorted(set(idx)), str(results), opts, overrides=over)
    bad = [r for r in records if r["violations"] or r.get("error")]
    for r in records:
        request.node.user_properties.append((f"run {r['seed']}/{r['run']}",
                                             f"{r['outcome']} {r['duration_s']}s "
                                             f"{[f['kind'] + '@' + f['phase'] for f in r['faults']]}"))
    print(campaign.summary(results))
    assert not bad, "campaign runs with violations or harness errors:\n" + "\n".join(
        json.dumps({k: r.get(k) for k in ("seed", "run", "faults", "outcome", "violations", "error")})
        for r in bad)


def test_campaign_oracles_object_to_broken_configurations(tmp_path):
    """The oracles are not vacuous: the same run (seed 1, run 6: A isolated
    both ways at steady state, B promotes) with output not buffered
    (--netbuf none) must fail the client oracle, and with fail-stop
    arbitration (--arbiter none) the one-copy oracle."""
    campaign = _campaign()
    why = campaign.requirements_missing()
    if why:
        pytest.fail(why, pytrace=False)
    recs = {}
    for name, over in (("netbuf none", {"netbuf": "none"}), ("arbiter none", {"arbiter": "none"})):
        opts = campaign.default_opts(work_dir=str(tmp_path / "work"), no_keep=True, proxy=False, **over)
        (r,) = campaign.run_campaign("1", [6], None, opts)
        assert not r.get("error"), r
        assert [f["kind"] for f in r["faults"]] == ["isolate_A"], f"seed 1 run 6 changed: {r['faults']}"
        recs[name] = {v["oracle"] for v in r["violations"]}
    assert "client" in recs["netbuf none"], recs
    assert "one-copy" in recs["arbiter none"], recs
