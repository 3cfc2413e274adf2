"""Report v2: verdict, per-feature leakage, privacy and utility, escaping, `drivepriv report`
rebuilding from saved results, a page comparing runs, and the privacy-utility sweep."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from drivepriv.report.html import iter_links


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "drivepriv", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    r = run("eval", "--scenario", "merge", "--quick", "--out", str(out), "--no-progress", cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (out / "merge").iterdir()
    return run_dir


def _links_resolve(page: Path) -> None:
    html = page.read_text()
    for link in iter_links(html):
        if link.startswith(("#", "http")):
            continue
        assert (page.parent / link).exists(), link


def test_report_opens_with_a_verdict_and_the_leakage_table(quick_run):
    html = (quick_run / "report.html").read_text()
    assert 'id="verdict"' in html and "ego&#39;s position within 1 m in" in html
    assert "What leaks, feature by feature" in html and "ego speed" in html and "neighbour positions" in html
    assert "Privacy and utility" in html and "mean episode return" in html
    assert "drivepriv report" in html  # the reproducibility block says how to rebuild it
    leakage = pd.read_csv(quick_run / "leakage.csv")
    assert set(leakage["attack"]) == {"rgia-k", "rgia", "dlg"}
    pos = leakage[leakage["feature"] == "ego position"]
    assert ((pos["within"] >= 0) & (pos["within"] <= 1)).all() and (pos["n"] == 2 * 4).all()  # 2 clients x batch 4
    _links_resolve(quick_run / "report.html")


def test_report_rebuilds_from_saved_results(quick_run, tmp_path):
    copy = tmp_path / quick_run.name
    shutil.copytree(quick_run, copy)
    before = (copy / "metrics.csv").read_bytes()
    for name in ("report.html", "leakage.csv"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    shutil.rmtree(copy / "videos")
    r = run("report", str(copy), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {copy / 'report.html'}" in r.stdout
    assert (copy / "metrics.csv").read_bytes() == before  # nothing re-run
    assert list((copy / "figures").glob("*.png")) and list((copy / "videos").glob("*.mp4"))
    rebuilt = (copy / "report.html").read_text()
    original = (quick_run / "report.html").read_text()
    strip = lambda h: re.sub(r"generated [^<]*|on \d{4}-\d\d-\d\d [\d:]+ UTC", "", h)  # noqa: E731
    assert strip(rebuilt) == strip(original)


def test_compare_page_links_every_run(quick_run, tmp_path):
    other = tmp_path / "other"
    r = run("eval", "--scenario", "merge", "--quick", "--seed", "3", "--out", str(other), "--no-progress", "--defense", "topk:fraction=0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (second,) = (other / "merge").iterdir()
    r = run("report", str(quick_run), str(second), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert len(table) == 2 * 3 and set(table["seed"]) == {0, 3}  # 2 runs x 3 attacks
    summary = pd.read_csv(tmp_path / "cmp" / "compare_summary.csv")
    assert len(summary) == 2 * 3 and (summary["runs"] == 1).all()
    assert set(table["defenses"]) == {"none", "topk(fraction=0.1)"}
    page = tmp_path / "cmp" / "report.html"
    assert (tmp_path / "cmp" / "tradeoff.png").is_file()
    _links_resolve(page)


def test_texts_from_configs_and_file_names_are_escaped(tmp_path):
    yaml_text = (Path(__file__).resolve().parents[2] / "scenarios" / "merge.yaml").read_text()
    yaml_text = re.sub(r'description: ".*"', 'description: "<script>alert(1)</script> & <b>bold</b>"', yaml_text)
    scenario = tmp_path / "evil<i>.yaml"
    scenario.write_text(yaml_text)
    r = run("eval", "--scenario", str(scenario), "--quick", "--out", str(tmp_path / "out"), "--no-progress", "--attacks", "rgia", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = (tmp_path / "out" / "evil<i>").iterdir()
    html = (run_dir / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "evil<i>" not in html and "evil&lt;i&gt;" in html


def test_report_bad_input_is_a_clear_error(tmp_path):
    r = run("report", str(tmp_path / "nope"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("report", str(tmp_path / "empty"), cwd=tmp_path)
    assert r.returncode == 2 and "config.yaml" in r.stderr
    r = run("eval", "--scenario", "merge", "--quick", "--sweep", "secagg", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert r.returncode == 2 and "no strength" in r.stderr and not (tmp_path / "s").exists()


def test_sweep_writes_table_plot_and_page(tmp_path):
    r = run("eval", "--scenario", "merge", "--quick", "--sweep", "dpsgd", "--grid", "0,10", "--seeds", "0", "1", "--attacks", "rgia",
            "--set", "federation.eval_episodes=2", "--out", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (sweep,) = (tmp_path / "merge").iterdir()
    assert sweep.name.startswith("merge-sweep-dpsgd-seed0-1-") and not sweep.name.endswith(".incomplete")
    runs = pd.read_csv(sweep / "sweep.csv")
    assert len(runs) == 3 * 2 and sorted(set(runs["seed"])) == [0, 1]  # (baseline + 2 strengths) x 2 seeds
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert table["strength"].isna().iloc[0] and list(table["strength"].iloc[1:]) == [0.0, 10.0]  # baseline first
    assert (table["seeds"] == "0 1").all() and (table["runs"] == 2).all()
    assert table["defenses"].iloc[0] == "none" and pd.isna(table["epsilon"].iloc[0])
    assert table["epsilon"].iloc[1] == float("inf") and 0 < table["epsilon"].iloc[2] < 1
    assert table[["error_median", "within_share", "mean_return", "collision_rate"]].notna().all().all()
    base = runs[runs["strength"].isna()]["mean_return"].mean()
    means = runs.groupby("strength")["mean_return"].mean()
    assert table["mean_return"].tolist() == pytest.approx([base, means[0.0], means[10.0]])
    assert (sweep / "tradeoff.png").stat().st_size > 10_000
    _links_resolve(sweep / "report.html")
    assert "strength" in r.stdout and "report:" in r.stdout
