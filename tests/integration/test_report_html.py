"""Reports from real tiny runs: `python -m factory.run -m loss=fkl,rkl` at the smallest sizes with
the report callback, then the run reports' rows and numbers against the eval/ledger files, the
sweep report's ranking, and the HTML opened in headless Chromium (Debian package `chromium`,
installed by .ci/install-system-deps.sh): its table renders, no image is broken, and the
screenshot is not blank."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_sizes import COMPARE_TINY

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# the default pipeline (compare) at the smallest sizes that still run every stage
SMALL = COMPARE_TINY
# teacher, base, the distillation rows, the four-stage rows; unknown labels after them
ROW_ORDER = ("teacher", "base", "off_policy", "on_policy", "cold_start", "reasoning_rl", "fusion",
             "general_rl")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def factory_run(*args: str, multirun: bool = False) -> None:
    done = subprocess.run([sys.executable, "-m", "factory.run", *(["-m"] if multirun else []),
                           *SMALL, "hydra/callbacks=report", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was not built" not in done.stdout + done.stderr, done.stdout[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real two-run sweep from an empty store: job 0 makes every artifact, job 1 (loss=rkl)
    reuses all but the distillation stages and their evals."""
    root = tmp_path_factory.mktemp("reports")
    factory_run("loss=fkl,rkl", f"artifacts_dir={root / 'store'}",
                f"hydra.sweep.dir={root / 'sweep'}", multirun=True)
    return root / "sweep"


def md_table(md: str, heading: str) -> tuple[list[str], list[dict]]:
    """The first Markdown table after `## heading`: its header, and its rows as dicts."""
    lines = md.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[start:end]]
    return cells[0], [dict(zip(cells[0], row)) for row in cells[2:]]


def made_hours(entry: dict) -> float:
    return (entry["original"] if entry["reused"] else entry)["device_hours"]


@pytest.mark.parametrize("job", ["0", "1"])
def test_a_run_report_holds_every_row_and_column_with_the_files_numbers(sweep, job):
    run = sweep / job
    evals = [json.loads(p.read_text()) for p in sorted((run / "eval").glob("*.json"))]
    ledger = json.loads((run / "ledger.json").read_text())["stages"]
    loss_free = [e for e in ledger if not e["stage"].startswith(("distill/", "eval/off_policy",
                                                                 "eval/on_policy"))]
    assert all(e["reused"] for e in loss_free) == (job == "1")
    assert not any(e["reused"] for e in ledger if e not in loss_free)
    header, rows = md_table((run / "report.md").read_text(), "Comparison")

    labels = {r["model"] for r in evals}
    assert [r["model"] for r in rows] == [lb for lb in ROW_ORDER if lb in labels] \
        + sorted(labels - set(ROW_ORDER)) + ["guessing"]
    by_model = {r["model"]: r for r in rows}
    for r in evals:
        k = 64 if "64" in r["pass@k"] else max(map(int, r["pass@k"]))
        row = by_model[r["model"]]
        assert row[f"{r['task']} {r['mode']} Pass@1 (Pass@{k}), %"] == \
            f"{100 * r['pass@1']:.1f} ({100 * r['pass@k'][str(k)]:.1f})"
        assert row[f"{r['task']} {r['mode']} ThinkFollow, %"] == f"{100 * r['think_follow']:.1f}"

    # the teacher's row is its bootstrap, the base's its pretraining; at the cost of making them,
    # so the run that reused every artifact shows what the run that made them paid
    stages = {e["stage"]: e for e in ledger}
    teacher = sum(made_hours(e) for e in ledger if e["arm"] == "teacher")
    unit = "CPU core-h"
    assert float(by_model["teacher"][f"{unit}, teacher-side in full"]) == \
        pytest.approx(teacher, rel=1e-3)
    assert float(by_model["base"][f"{unit}, teacher-side amortised"]) == \
        pytest.approx(made_hours(stages["student/base"]), rel=1e-3)
    util = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["h100_utilization"]
    flops = (stages["student/base"]["original"] if job == "1" else stages["student/base"])["flops"]
    assert float(by_model["base"]["projected H100-h, in full"]) == \
        pytest.approx(flops / (989e12 * util) / 3600, rel=1e-3)

    _, cost = md_table((run / "report.md").read_text(), "Cost breakdown")
    assert [c["stage"] for c in cost] == [e["stage"] for e in ledger]
    for c, e in zip(cost, ledger):
        assert float(c["device-h this run"]) == pytest.approx(e["device_hours"], rel=1e-3)
        assert float(c["device-h to make"]) == pytest.approx(made_hours(e), rel=1e-3)
    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert {"pass_at_k.png", "cost.png"} <= plots
    assert "training.png" in plots  # job 1 trained the distillation arm again


def test_the_sweep_report_ranks_its_runs(sweep):
    md = (sweep / "report.md").read_text()
    header, rows = md_table(md, "Runs ranked")
    metric = header[3].removesuffix(", %")
    model, mode, field = metric.split("/")
    assert header[:3] == ["rank", "run", "loss"]
    assert sorted((r["run"], r["loss"]) for r in rows) == [("0", "fkl"), ("1", "rkl")]
    values = []
    for r in rows:
        result = json.loads((sweep / r["run"] / "eval" / f"{model}-{mode}.json").read_text())
        assert field == "pass@1" and r[header[3]] == f"{100 * result['pass@1']:.1f}"
        values.append(result["pass@1"])
    assert [r["rank"] for r in rows] == ["1", "2"] and values == sorted(values, reverse=True)
    _, diff = md_table(md, "Config keys that differ between runs")
    assert [(d["run"], d["loss.kind"]) for d in diff] == [("0", "fkl"), ("1", "rkl")]
    assert (sweep / "plots" / "ranking.png").is_file()


def test_the_callback_writes_the_report_of_a_single_run(sweep, tmp_path):
    store = sweep.parent / "store"  # every artifact is there: the run reuses them all
    factory_run(f"artifacts_dir={store}", f"hydra.run.dir={tmp_path / 'run'}")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Comparison" in md and (tmp_path / "run" / "report.html").is_file()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Counts, after the page's load event, the <img> elements and those that did not decode. Injected
# into a copy of the report only: the report itself carries no script.
PROBE = ("<script>window.addEventListener('load', function () {"
         "var imgs = Array.prototype.slice.call(document.images);"
         "document.body.setAttribute('data-images', imgs.length);"
         "document.body.setAttribute('data-broken', imgs.filter(function (i) {"
         "return !i.complete || i.naturalWidth === 0; }).length); });</script>")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (Debian package "
                    "`chromium`; .ci/install-system-deps.sh installs it)")
@pytest.mark.parametrize("which", ["0/report.html", "report.html"])
def test_the_html_report_renders_in_headless_chromium(sweep, tmp_path, which):
    from matplotlib.image import imread

    html = (sweep / which).read_text()
    assert "<script" not in html
    n_images = len(re.findall(r"<img\b", html))
    assert n_images >= 1
    page = tmp_path / "probe.html"  # outside the report's folder: it must need no sibling file
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run",
         "--window-size=1280,1600", f"--screenshot={shot}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body[^>]*>", done.stdout).group(0)
    assert f'data-images="{n_images}"' in body and 'data-broken="0"' in body, body
    table_id = "comparison" if which != "report.html" else "ranking"
    table = re.search(rf'<table id="{table_id}">.*?</table>', done.stdout, re.S).group(0)
    assert table.count("<tr>") >= 3  # the header and at least two rows

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 0.05  # text, tables and plots, not a blank page
    assert (pixels < 0.5).mean() > 0.005  # dark ink covers part of the page
