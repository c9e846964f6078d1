"""Every command in the fenced code blocks of README.md and docs/*.md, run at small sizes.

`documented_commands` finds them (lines of shell blocks that start like a command); CHECKS says
how each is run here: `Run` runs it with arguments that keep it short appended or substituted,
`Serve` starts a server and waits for /health, `NotRun` names why it cannot run on a CPU machine
in a test and runs a check of its configuration instead. A command in the docs that CHECKS does
not know, or an entry of CHECKS no longer in the docs, fails `test_every_documented_command_is_checked`.

`make` runs with the installs marked up to date (`-o` both stamps) and this interpreter as PY, so
a test never reinstalls; Python commands run in a temporary directory (Hydra's outputs go there).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
COMMAND = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:(?:python3?|make|pip3?|curl|bash|sh|uv|git|cd|export)(?:\s|$)|(?:\.ci|scripts|\.)/\S)"
)
TIMEOUT_S = 600

SIM_SHORT = "sim.num_sessions=4 output.plots=false wandb.mode=disabled"  # last value of a key wins
CHECK_POLICY_SHORT = "EXAMPLES=3"


def documented_commands() -> dict[str, list[str]]:
    """Command (whitespace normalised, comment dropped, continuations joined) -> where it appears."""
    found: dict[str, list[str]] = {}
    for path in DOC_FILES:
        lang, pending = None, ""
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fence = re.match(r"^\s*```(\S*)", line)
            if fence:
                lang = fence.group(1) if lang is None else None
                continue
            if lang not in SHELL_LANGS:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1].rstrip() + " "
                continue
            pending = ""
            text = re.sub(r"\s+#.*$", "", text)
            if COMMAND.match(text):
                found.setdefault(" ".join(text.split()), []).append(f"{path.relative_to(REPO)}:{number}")
    return found


@dataclass(frozen=True)
class Run:
    """Runs the command with `replace` (old, new) substitutions and `extra` appended; `expect` in its output."""

    extra: str = ""
    replace: tuple[tuple[str, str], ...] = ()
    expect: tuple[str, ...] = ()


@dataclass(frozen=True)
class Serve:
    """Starts the server (`extra` appended), waits for /health and GET /v1/models, stops it."""

    extra: str = ""


@dataclass(frozen=True)
class NotRun:
    """Cannot run here (`reason`); `check` runs instead (a config or dry-run check) with `expect` in its output."""

    reason: str
    check: str
    expect: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchEmbedded:
    """bench_serving against the embedded server that `make serve` started, cut to `extra`."""

    extra: str = "--sessions 1 --max-requests 1"


CFG_JOB = "--cfg job"
MAKE_DRY = "make -n"

CHECKS: dict[str, object] = {
    # README.md
    "make demo": Run(
        extra="ARGS='sim.num_sessions=4 output.plots=false hydra.sweep.dir={tmp}/demo'",
        expect=("lpm_lru", "comparison"),
    ),
    "make test": NotRun("runs the whole suite, this test included", f"{MAKE_DRY} test", ("pytest",)),
    "make check-policy POLICY=short_prefill_first MODULES=controlplane.examples": Run(extra=CHECK_POLICY_SHORT),
    "python -m experiments.simulate scheduler.ordering=short_prefill_first 'scheduler.policy_modules=[controlplane.examples]'": Run(  # noqa: E501
        extra=SIM_SHORT, expect=("4 of 4 sessions",)
    ),
    "python -m engine.serve scheduler.ordering=short_prefill_first 'scheduler.policy_modules=[controlplane.examples]'": Serve(),  # noqa: E501
    "python -m experiments.calibrate": NotRun(
        "runs the engine on a GPU over a grid", "python -m experiments.calibrate --help", ("--fit", "--quick")
    ),
    "python -m experiments.fidelity": NotRun(
        "runs the engine on a GPU in real time",
        f"python -m experiments.fidelity {CFG_JOB}",
        ("swe_smith_c1", "agentic_lpm_ttl5"),
    ),
    "make serve": Serve(),
    "python -m engine.serve scheduler.admission=tps_floor 'engine.step_cost={model:smollm2_135m,hardware:cpu}'": Serve(),  # noqa: E501
    "python -m experiments.bench_lookahead --quick": Run(
        extra="--sessions 3 --candidates fcfs session_las", expect=("look-ahead",)
    ),
    "python -m engine.serve model=/models/Qwen3-8B port=9000 api_key=secret": NotRun(
        "needs a Qwen3-8B checkpoint at /models/Qwen3-8B",
        f"python -m engine.serve model=/models/Qwen3-8B port=9000 api_key=secret {CFG_JOB}",
        ("model: /models/Qwen3-8B", "port: 9000", "api_key: secret"),
    ),
    "python -m experiments.bench_serving --workload agentic_coding --sessions 4 --concurrency 2 --pause-scale 0.1 "
    "--params prefix_tokens_min=500 prefix_tokens_max=1000 new_tokens_mean=50 new_tokens_max=200 output_mean=16 "
    "output_max=32 calls_mean=3 context_max=8192": BenchEmbedded(),
    "python -m experiments.simulate policy=ttl workload=swe_smith sim=closed": Run(extra=SIM_SHORT),
    "python -m experiments.simulate hardware=h100_sxm cost=profile": Run(extra=SIM_SHORT),
    "python -m experiments.simulate -m policy=lru,ttl,lpm_ttl hydra/launcher=joblib": Run(
        extra=SIM_SHORT, expect=("lpm_ttl",)
    ),
    "make walkthrough": Run(),
    "make notebook": NotRun(
        "re-executes notebooks/compare_policies.ipynb in place (minutes); "
        "tests/test_notebook.py runs both notebooks at small sizes",
        f"{MAKE_DRY} notebook",
        ("experiments.run_notebook notebooks/compare_policies.ipynb",),
    ),
    "make check-policy POLICY=ttl:ttl=5": Run(extra=CHECK_POLICY_SHORT),
    "make bench": Run(extra="ARGS=--quick", expect=("step+commit latency", "req/min")),
    "make test-fast": NotRun(
        "runs most of the suite, this test included",
        f"{MAKE_DRY} test-fast",
        ("not slow and not gpu", "TANDEM_HYPOTHESIS_PROFILE=dev"),
    ),
    "make lint": Run(expect=("All checks passed",)),
    "TANDEM_HYPOTHESIS_EXAMPLES=2000 make test": NotRun(
        "runs the whole suite, this test included", f"TANDEM_HYPOTHESIS_EXAMPLES=2000 {MAKE_DRY} test", ("pytest",)
    ),
    ".ci/run": NotRun("runs make test: the whole suite, this test included", "bash -n {repo}/.ci/run"),
    "python3 -m pip install --no-build-isolation --no-deps . && make test-gpu": NotRun(
        "installs into the machine's python3 and runs the GPU tests", f"{MAKE_DRY} test-gpu", ("-m gpu",)
    ),
    # docs/simulator.md
    "python -m experiments.simulate scheduler=agentic scheduler.chunk_size=4096": Run(extra=SIM_SHORT),
    "python -m experiments.simulate": Run(extra=SIM_SHORT),
    "python -m experiments.simulate policy=tps_floor workload=swe_smith sim=closed": Run(extra=SIM_SHORT),
    "python -m experiments.bench_floor": Run(extra="--quick --concurrency 2 --rates 0.04", expect=("tps_floor",)),
    "python -m experiments.adversary policy=session_las": Run(
        extra="--examples 10 --checks starvation livelock --shrink-s 2", expect=("session_las",)
    ),
    "python -m experiments.adversary --save tests/data/adversarial": Run(
        replace=(("tests/data/adversarial", "found"),),
        extra="scheduler.eviction=ttl:ttl=5 --examples 40 --checks starvation --shrink-s 2",
        expect=("FOUND",),
    ),
    "python -m experiments.simulate policy=ttl workload=swe_smith sim=closed sim.concurrency=4": Run(extra=SIM_SHORT),
    "python -m experiments.simulate -m policy=lru,ttl,lpm_ttl cluster=prefix_aware_4 hydra/launcher=joblib": Run(
        extra=SIM_SHORT, expect=("lpm_ttl",)
    ),
    # wandb.mode=online: SIM_SHORT's wandb.mode=disabled comes later and wins (no network in tests)
    "python -m experiments.simulate hardware=h200 model=qwen3_8b sim.session_rate=0.1 wandb.mode=online": Run(
        extra=SIM_SHORT
    ),
    "python -m experiments.simulate workload=trace workload.params.path=run.jsonl": Run(
        replace=(("run.jsonl", "{repo}/tests/data/example_trace.jsonl"),), extra=SIM_SHORT
    ),
    "python -m experiments.simulate model.kv_cache_dtype=fp8_e4m3 model.quantization=fp8": Run(
        extra=SIM_SHORT, expect=("llama3_8b (kv_cache_dtype=fp8_e4m3, quantization=fp8)",)
    ),
    "python -m experiments.simulate -m model.kv_cache_dtype=auto,fp8_e4m3 model.quantization=none,fp8": Run(
        extra=SIM_SHORT, expect=("llama3_8b (kv_cache_dtype=fp8_e4m3)", "llama3_8b (quantization=fp8)")
    ),
    # docs/sweeps.md
    "python -m experiments.simulate -m policy=lru,ttl,lpm_lru sim=demo hydra/launcher=joblib": Run(
        extra=SIM_SHORT, expect=("lpm_lru",)
    ),
    "python -m experiments.simulate -m policy=lru,ttl,lpm_lru sim=demo hydra/launcher=ray": NotRun(
        "starts a Ray instance (tests/test_sweeps.py runs the Ray launcher); one job's config instead",
        f"python -m experiments.simulate policy=lru sim=demo hydra/launcher=ray {CFG_JOB.replace('job', 'hydra')}",
        ("hydra_ray_launcher",),
    ),
    "python -m experiments.simulate -m policy=lru,ttl,lpm_lru 'sim.seed=range(0,16)' hydra/launcher=ray_cluster "
    "hydra.sweep.dir=/shared/sweeps/lru_vs_ttl": NotRun(
        "needs a Ray cluster; one job's config instead",
        "python -m experiments.simulate policy=lru sim.seed=0 hydra/launcher=ray_cluster "
        "hydra.sweep.dir=/shared/sweeps/lru_vs_ttl --cfg hydra",
        ("hydra_ray_launcher",),
    ),
    "python -m experiments.simulate -m policy=lru,ttl,lpm_lru 'sim.seed=range(0,16)' hydra/launcher=slurm "
    "hydra.launcher.partition=cpu hydra.launcher.timeout_min=30 hydra.sweep.dir=/shared/sweeps/lru_vs_ttl": NotRun(
        "needs SLURM; one job's config instead",
        "python -m experiments.simulate policy=lru sim.seed=0 hydra/launcher=slurm hydra.launcher.partition=cpu "
        "hydra.launcher.timeout_min=30 hydra.sweep.dir=/shared/sweeps/lru_vs_ttl --cfg hydra",
        ("partition: cpu", "timeout_min: 30"),
    ),
    "python -m experiments.simulate -m sim=demo sim.num_sessions=60 'sim.seed=range(0,200)' output.plots=false "
    "wandb.mode=disabled hydra/launcher=joblib": Run(replace=(("range(0,200)", "range(0,2)"),), extra=SIM_SHORT),
    "python -m experiments.sweep_optuna ttl_ttft_p90": Run(extra=f"--trials 2 {SIM_SHORT}"),
    "python -m experiments.sweep_optuna pause_aware_goodput --trials 40 --batch-size 4 hydra/launcher=ray": Run(
        replace=(
            ("--trials 40", "--trials 2"),
            ("--batch-size 4", "--batch-size 2"),
            ("hydra/launcher=ray", "hydra/launcher=joblib"),
        ),
        extra=SIM_SHORT,
    ),
    "python -m experiments.sweep_optuna ttl_ttft_p90 sim.seed=1 cluster=least_loaded_4": Run(
        extra=f"--trials 2 {SIM_SHORT}"
    ),
    "python -m experiments.sweep_optuna my_study.yaml --storage sqlite:///study.db": Run(
        replace=(("my_study.yaml", "{repo}/conf/hydra/optuna/ttl_ttft_p90.yaml"),), extra=f"--trials 2 {SIM_SHORT}"
    ),
    # docs/policies.md (mypkg.policies: the policies of that page's code blocks)
    "python -m experiments.simulate scheduler.ordering=short_prefill_first scheduler.eviction=hit_weighted_lru "
    "'scheduler.policy_modules=[mypkg.policies]' cluster=least_loaded_4 cluster.router=most_free_kv": Run(
        extra=SIM_SHORT
    ),
    "python -m engine.serve scheduler.ordering=short_prefill_first 'scheduler.policy_modules=[mypkg.policies]'": NotRun(
        "the server start is README's same command with controlplane.examples; here its engine config is "
        "composed and built (EngineConfig imports mypkg.policies and checks the names)",
        "python -m engine.serve scheduler.ordering=short_prefill_first 'scheduler.policy_modules=[mypkg.policies]' "
        f"{CFG_JOB} | python -c '{{check_engine_config}}'",
        ("engine config ok",),
    ),
    "make check-policy POLICY=hit_weighted_lru MODULES=mypkg.policies": Run(extra=CHECK_POLICY_SHORT),
    "make check-policy POLICY=ttl:ttl=3 KIND=eviction EXAMPLES=1000": Run(replace=(("EXAMPLES=1000", "EXAMPLES=3"),)),
    "make check-policy POLICY=hit_weighted_lru MODULES=mypkg.policies SEED=0": Run(extra=CHECK_POLICY_SHORT),
    # docs/profile-format.md
    "python -m experiments.calibrate --fit PROFILE.csv [--save-to FIT.json]": Run(
        replace=(("PROFILE.csv", "{tmp}/profile.csv"), ("[--save-to FIT.json]", "--save-to {tmp}/fit.json")),
        expect=("fit: ",),
    ),
    # docs/serving.md
    "python -m engine.serve model=llama-3.1-8b engine.load_format=dummy engine.tokenizer=/path/to/tokenizer-dir": NotRun(  # noqa: E501
        "8B random weights (32 GB in float32 on a CPU) and a tokenizer directory",
        "python -m engine.serve model=llama-3.1-8b engine.load_format=dummy "
        f"engine.tokenizer=/path/to/tokenizer-dir {CFG_JOB}",
        ("model: llama-3.1-8b", "load_format: dummy", "tokenizer: /path/to/tokenizer-dir"),
    ),
    "python -m engine.serve data_parallel_size=2 cluster.router=prefix_aware": Serve(),
    "python -m engine.serve data_parallel_size=4 cluster.router=session_affinity scheduler.policy_modules=[my_routers]": NotRun(  # noqa: E501
        "my_routers is the reader's own module (the server start is the data_parallel_size=2 command's)",
        "python -m engine.serve data_parallel_size=4 cluster.router=session_affinity "
        f"scheduler.policy_modules=[my_routers] {CFG_JOB}",
        ("data_parallel_size: 4", "router: session_affinity", "- my_routers"),
    ),
}

# Reads `--cfg job`'s YAML from stdin and builds the EngineConfig the server would.
CHECK_ENGINE_CONFIG = (
    "import sys, yaml; from engine.config import EngineConfig; c = yaml.safe_load(sys.stdin); "
    'EngineConfig.from_dict({"model": c["model"], **c["engine"], "scheduler": c["scheduler"]}); '
    'print("engine config ok")'
)


def test_every_documented_command_is_checked():
    documented = documented_commands()
    unknown = {cmd: where for cmd, where in documented.items() if cmd not in CHECKS}
    assert not unknown, f"commands in the docs that {__name__}.CHECKS does not know how to run: {unknown}"
    stale = sorted(set(CHECKS) - set(documented))
    assert not stale, f"CHECKS entries no longer in the docs: {stale}"


def test_the_extractor_reads_continuations_comments_and_only_shell_blocks(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```\nmake demo   # a comment\nplan = sched.step(now)\n```\n```python\nmake notpython\n```\n"
        "   ```bash\n   python -m a b \\\n       c\n   X=1 make test\n   .ci/run\n   ```\n"
        "make outside\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "DOC_FILES", [doc])
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert documented_commands() == {
        "make demo": ["x.md:2"],
        "python -m a b c": ["x.md:10"],
        "X=1 make test": ["x.md:11"],
        ".ci/run": ["x.md:12"],
    }


# --------------------------------------------------------------------------- running them


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory, a `mypkg.policies` built from docs/policies.md's code and a profile CSV."""
    root = tmp_path_factory.mktemp("docs")
    text = (REPO / "docs" / "policies.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "@cp.register_policy" in b]
    assert len(blocks) == 4, "docs/policies.md's four example policies"
    (root / "pkg" / "mypkg").mkdir(parents=True)
    (root / "pkg" / "mypkg" / "__init__.py").write_text("")
    (root / "pkg" / "mypkg" / "policies.py").write_text(
        "import math\n\nimport controlplane as cp\n\n" + "\n".join(blocks)
    )
    import test_calibrate as T  # a synthetic engine's grid: a profile CSV to refit

    from controlplane.profile import write_profile

    write_profile(
        root / "profile.csv",
        T.calibrate_simulated(T.truth_cost(), T.GRID, T.MAIN, T.SWAP),
        {**T.FIT_META, "model": "smollm2_135m", "hardware": "cpu"},
    )
    return root


def shell(command: str, root: Path) -> str:
    """The documented command as this test runs it: this interpreter, make without reinstalling."""
    py = shlex.quote(sys.executable)
    command = re.sub(r"(^|&& |\| )python3? ", rf"\1{py} ", command)
    make = f"make -s -C {shlex.quote(str(REPO))} -o .venv/.stamp-install -o .venv/.stamp-sim PY={py}"
    command = re.sub(r"(^|&& |\s)make (-n )?", lambda m: f"{m.group(1)}{make} {m.group(2) or ''}", command)
    return (
        command.replace("{tmp}", str(root))
        .replace("{repo}", str(REPO))
        .replace("{check_engine_config}", CHECK_ENGINE_CONFIG)
    )


def environment(root: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root / "pkg"), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def run_shell(command: str, root: Path, expect=()) -> str:
    done = subprocess.run(
        ["bash", "-c", shell(command, root)],
        cwd=root,
        env=environment(root),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout[-4000:]}"
    for text in expect:
        assert text in done.stdout, f"{command!r}: {text!r} not in its output:\n{done.stdout[-4000:]}"
    return done.stdout


class Server:
    """A documented server command, started on a free port and stopped by SIGTERM to its process group."""

    def __init__(self, command: str, root: Path, extra: str = "") -> None:
        self.port = free_port()
        overrides = f"port={self.port} log_level=warning hydra.run.dir={root}/serve-{self.port} {extra}".strip()
        self.command = f"{command} ARGS='{overrides}'" if command.startswith("make ") else f"{command} {overrides}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"serve-{self.port}.log"
        self.root = root

    def __enter__(self) -> "Server":
        import httpx

        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", shell(self.command, self.root)],
                cwd=self.root,
                env=environment(self.root),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert self.proc.poll() is None, f"{self.command!r} exited {self.proc.returncode}:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{self.command!r}: no /health in {TIMEOUT_S} s:\n{self.log_tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        models = httpx.get(f"{self.url}/v1/models", timeout=10)
        assert models.status_code == 200 and models.json()["data"], models.text
        return self

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def embedded_server(workdir):
    """`make serve`: the embedded SmolLM2 on CPU, for `make serve`'s check and README's bench_serving."""
    pytest.importorskip("httpx")
    with Server("make serve", workdir) as server:
        yield server


SLOW = (Serve, BenchEmbedded)  # a server start: about 30 s each on 2 CPU cores


@pytest.mark.parametrize(
    "command", [pytest.param(c, marks=pytest.mark.slow) if isinstance(k, SLOW) else c for c, k in CHECKS.items()]
)
def test_documented_command(command, workdir, request):
    check = CHECKS[command]
    if isinstance(check, Run):
        for old, new in check.replace:
            assert old in command
            command = command.replace(old, new)
        run_shell(f"{command} {check.extra}".strip(), workdir, check.expect)
    elif isinstance(check, NotRun):
        run_shell(check.check, workdir, check.expect)
    elif isinstance(check, Serve):
        if command == "make serve":
            request.getfixturevalue("embedded_server")
        else:
            with Server(command, workdir, check.extra):
                pass
    elif isinstance(check, BenchEmbedded):
        server = request.getfixturevalue("embedded_server")
        args = re.sub(r"--sessions \d+", "", command)
        out = run_shell(f"{args} --base-url {server.url}/v1 {check.extra}", workdir)
        assert "warning:" not in out and re.search(r"requests [1-9]", out), out[-4000:]
    else:  # pragma: no cover
        raise AssertionError(f"unknown check {check!r}")
