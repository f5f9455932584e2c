"""The benchmark harness: build the job list of a suite, run each job in its own process, collect.

    result = run_suite("quick", out_dir=Path("benchmarks/results"))   # -> dict, also .json/.md/.png
    jobs = suite_jobs("full", configs=["eager-fp32", "optc"], models=["tiny-lm"])

Suites (``tiny`` shrinks every shape so the harness itself can be tested in seconds):
  full   roofline; the trained tiny LM (decode + accuracy) and the TinyLlama-1.1B shape (random
         weights: decode, prefill at T=512 and 2048) under every LM configuration; all-MiniLM-L6-v2
         (batch 32 x 128, cosine vs fp32) under every encoder configuration
  quick  roofline; the tiny LM under every configuration without Inductor (cold compiles take
         1-2 min each); MiniLM under eager fp32, optc and ONNX Runtime; TinyLlama-1.1B decode and
         T=512 prefill for eager fp32 and the default optc preset; one steady run per row

Each job runs ``python -m benchmarks.worker`` with fresh Inductor and optc cache directories (so
"compile" is a cold compile every time) and a timeout; a job that fails, crashes or times out is a
row with its error. The child's peak RSS (``os.wait4``) is recorded beside the worker's own
per-phase peaks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUITES = ("quick", "full")
# Wall-clock budget of a suite: jobs not started when it is used up become rows saying so, and a
# running job's timeout is cut to what is left (the issue: quick <= 10 min, full <= 60 min).
BUDGET_S = {"quick": 9.5 * 60, "full": 58 * 60}

# Per-model job settings. prompt/new tokens follow the issue: batch 1, 128-token prompt, 64 greedy.
_LM = dict(task="lm", prompt_len=128, new_tokens=64, repeats=3, prefill_lengths=[], prefill_repeats=2,
           accuracy=False, eval_tokens=64 * 256 + 1)
_ENC = dict(task="encoder", batch=32, seq=128, repeats=5)


@dataclass
class Job:
    task: str
    model: str
    config: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 900.0
    budget_cut: bool = False          # the timeout was shortened to what is left of the suite's budget

    @property
    def label(self) -> str:
        return f"{self.task}:{self.model}:{self.config}" if self.config else f"{self.task}:{self.model}"


def _lm_jobs(model: str, configs: list[str], timeout: float, **over: Any) -> list[Job]:
    return [Job("lm", model, c, {**_LM, **over}, timeout) for c in configs]


def suite_jobs(suite: str, *, tiny: bool = False, configs: list[str] | None = None,
               models: list[str] | None = None) -> list[Job]:
    """The jobs of `suite`; `configs` / `models` keep only those names (roofline always runs)."""
    from benchmarks.configs import config_names
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    lm_all, enc_all = config_names("lm"), config_names("encoder")
    quick = suite == "quick"
    if tiny:   # shapes small enough for a test; same code paths
        jobs = [Job("stream", "stream", "start", {"gib": 1 / 16, "repeats": 2}, 120)]
        jobs += _lm_jobs("tiny-lm", lm_all, 300, prompt_len=16, new_tokens=8, repeats=1,
                         accuracy=True, eval_tokens=8 * 256 + 1)
        jobs += _lm_jobs("llama-tiny", lm_all, 300, prompt_len=16, new_tokens=8, repeats=1,
                         prefill_lengths=[32, 64], prefill_repeats=1)
        jobs += [Job("encoder", "bert-tiny", c, {**_ENC, "batch": 4, "seq": 16, "repeats": 2}, 300)
                 for c in enc_all]
    elif quick:
        # Sized from the full run's per-job times on the busy 2-core VM (~9.5 min there): no
        # Inductor peers (a cold compile is 1-2 min each), one steady run per row, TinyLlama-1.1B
        # for eager fp32 and the default optc preset only.
        jobs = [Job("stream", "stream", "start", {"gib": 1.0, "repeats": 3}, 300)]
        jobs += _lm_jobs("tiny-lm", [c for c in lm_all if "inductor" not in c], 300, repeats=1, accuracy=True)
        jobs += [Job("encoder", "minilm", c, {**_ENC, "repeats": 3}, 300)
                 for c in enc_all if c in ("eager-fp32", "optc", "onnxruntime")]
        jobs += _lm_jobs("tinyllama-1.1b", [c for c in lm_all if c in ("eager-fp32", "optc")], 300, repeats=1,
                         prefill_lengths=[512], prefill_repeats=1)
    else:
        # Accuracy rows first, TinyLlama (the slowest) last: if the budget runs out, what is lost
        # is the end of the TinyLlama table (peers come before presets).
        jobs = [Job("stream", "stream", "start", {"gib": 1.0, "repeats": 5}, 300)]
        jobs += _lm_jobs("tiny-lm", lm_all, 400, accuracy=True)
        jobs += [Job("encoder", "minilm", c, dict(_ENC), 400) for c in enc_all]
        # TinyLlama: a first call + one steady run (63 decode steps; fp32 prefill at 2048 is ~31 s).
        # T=2048 only for eager, the Inductor bf16 peer (the fastest prefill peer at T=512), the
        # lossless optc presets, the bf16-activation quantized presets and one fp32-activation
        # one (int4-g128: it shows what fp32 activations cost at 2048): the other rows' 2048
        # runs cost ~11 min for the peers (cold compiles at a new length; torchao's weight-only
        # kernels run 2048 at ~0.6x eager fp32) and ~5 min for the other fp32-activation
        # presets, which the 60-minute budget does not hold. Their cells say so.
        from benchmarks.configs import all_configs
        long_rows = {"eager-fp32", "eager-bf16", "inductor-bf16", "optc-int4-g128"} | {
            n for n, c in all_configs().items()
            if c.kind == "optc" and (n in ("optc", "optc-bf16") or n.endswith("-bf16"))}
        jobs += [Job("lm", "tinyllama-1.1b", c,
                     {**_LM, "repeats": 1, "prefill_repeats": 1,
                      "prefill_lengths": [512, 2048] if c in long_rows else [512],
                      **({} if c in long_rows else
                         {"prefill_skipped": {"2048": "not measured in the full suite (time budget): "
                                              "T=2048 runs for eager, inductor-bf16, the lossless and "
                                              "bf16-activation optc rows and optc-int4-g128"}})},
                     600) for c in lm_all]
    if configs is not None:
        jobs = [j for j in jobs if j.task == "stream" or j.config in configs]
    if models is not None:
        jobs = [j for j in jobs if j.task == "stream" or j.model in models]
    # Bandwidth again at the end: the report takes the best of both, so a burst of other load
    # during one measurement does not set the ceiling.
    return jobs + [Job("stream", "stream", "end", jobs[0].params, jobs[0].timeout_s)]


def jobs_for_model(model: str, suite: str = "quick", configs: list[str] | None = None) -> list[Job]:
    """What ``optc bench MODEL`` runs: the suite's jobs for `model` when the suite has it; else the
    suite's LM settings for any zoo Llama (speed only) or its encoder settings for a zoo BERT."""
    import models
    from benchmarks.configs import config_names
    model = model.removeprefix("zoo:")
    jobs = [j for j in suite_jobs(suite, configs=configs) if j.model == model]
    start, end = (j for j in suite_jobs(suite) if j.task == "stream")
    if any(j.task != "stream" for j in jobs):
        return [start, *(j for j in jobs if j.task != "stream"), end]
    family = models.family_of(model)            # ValueError names the accepted models
    keep = (lambda names: [n for n in names if configs is None or n in configs])
    if family == "llama":
        max_len = models.model_args(model).max_seq_len
        lengths = [T for T in ((512,) if suite == "quick" else (512, 2048)) if T <= max_len]
        prompt = min(128, max_len // 2)
        new = ([Job("lm", model, c, {**_LM, "prompt_len": prompt, "new_tokens": min(64, max_len - prompt),
                                     "prefill_lengths": lengths, "repeats": 1 if suite == "quick" else 2},
                    1500) for c in keep(config_names("lm"))])
    elif family == "bert":
        new = [Job("encoder", model, c, dict(_ENC), 900) for c in keep(config_names("encoder"))]
    else:
        raise ValueError(f"optc bench measures Llama decoders (static KV cache) and BERT encoders; "
                         f"{model!r} is a {family} model")
    return [start, *new, end]


# ---- running ----------------------------------------------------------------------------------
def machine_info(threads: int) -> dict[str, Any]:
    import torch
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "threads": threads,
        "isa": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                                "amx_bf16", "amx_int8", "amx_tile")),
        "torch": torch.__version__, "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    """HEAD's short hash, with "+dirty" when tracked files differ from it (the run used those)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def run_job(job: Job, threads: int, scratch: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one job in a fresh process; always returns a row (with "error" when it failed)."""
    work = Path(tempfile.mkdtemp(prefix="job-", dir=scratch))
    spec = {"task": job.task, "model": job.model, "config": job.config, "threads": threads,
            "tmp": str(work / "tmp"), "time_limit_s": job.timeout_s, **job.params, **(extra or {})}
    (work / "job.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    # Cold compiles every time, and nothing written outside the scratch directory.
    env["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    env["OPTC_CACHE_DIR"] = str(work / "optc")
    env["HF_HUB_OFFLINE"] = "1"
    # OMP_WAIT_POLICY is the caller's (unset: libgomp spins a while after each parallel region,
    # then sleeps; what a user's process gets). Up to 2026-12-02 the harness forced PASSIVE (spin
    # waits make 2 threads crawl when another process shares the cores), but then every parallel
    # region of a decode step wakes a sleeping thread, and on the EPYC VM that cost every
    # configuration up to half its decode speed (benchmarks.decode_ab --wait-policies
    # PASSIVE,default: torchao int4 14.3 vs 26.5 tok/s, optc int4 31.0 vs 48.5). For a shared
    # host: OMP_WAIT_POLICY=PASSIVE python -m benchmarks run ...
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    row: dict[str, Any] = {"task": job.task, "model": job.model, "config": job.config, **job.params}
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", str(work / "job.json"),
                                 str(work / "result.json")], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=root)
        status, rusage = _wait(proc, job.timeout_s)
    row["process_wall_s"] = round(time.perf_counter() - t0, 2)
    row["process_peak_rss_mib"] = round(rusage.ru_maxrss / 1024, 1) if rusage else None
    result_path = work / "result.json"
    if status == "timeout":
        row["error"] = (f"stopped after {job.timeout_s:.0f} s: the suite's time budget ran out"
                        if job.budget_cut else f"timed out after {job.timeout_s:.0f} s")
    elif result_path.exists():
        row.update(json.loads(result_path.read_text()))
    else:
        tail = (work / "log.txt").read_text(errors="replace")[-1500:]
        row["error"] = f"worker exited with status {status} and no result: {tail}"
    shutil.rmtree(work, ignore_errors=True)
    return row


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[Any, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, rusage
        if time.monotonic() > deadline:
            proc.kill()
            _, _, rusage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return "timeout", rusage
        time.sleep(0.2)


Progress = Callable[[int, int, Job, dict[str, Any] | None], None]


def run_jobs(jobs: list[Job], *, threads: int = 2, progress: Progress | None = None,
             budget_s: float | None = None) -> list[dict[str, Any]]:
    """Run `jobs` one after another (never two at once: they would time each other). Big random-
    weight zoo models are built once, into a scratch weight file every worker of that model loads.
    With `budget_s`, jobs are cut short or not started once that much wall time has passed."""
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + budget_s if budget_s else None
    with tempfile.TemporaryDirectory(prefix="optc-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        weights: dict[str, str] = {}
        for i, job in enumerate(jobs):
            if progress:
                progress(i, len(jobs), job, None)
            if deadline is not None and job.task != "stream":   # bandwidth: always (seconds)
                left = deadline - time.monotonic()
                if left < 10:
                    rows.append({"task": job.task, "model": job.model, "config": job.config, **job.params,
                                 "error": f"not run: the suite's time budget ({budget_s / 60:.1f} min) "
                                          "was used up"})
                    if progress:
                        progress(i + 1, len(jobs), job, rows[-1])
                    continue
                if left < job.timeout_s:
                    job = Job(job.task, job.model, job.config, job.params, left, budget_cut=True)
            extra: dict[str, Any] = {}
            if job.task == "lm" and job.model not in ("tiny-lm",) and _is_big(job.model):
                if job.model not in weights:
                    path = str(scratch / f"{job.model}.safetensors")
                    made = run_job(Job("weights", job.model, "", {"weights": path}, 900), threads, scratch)
                    weights[job.model] = path if "error" not in made else ""
                extra["weights"] = weights[job.model] or None
            row = run_job(job, threads, scratch, extra)
            row.pop("weights", None)
            rows.append(row)
            if progress:
                progress(i + 1, len(jobs), job, row)
    return rows


def _is_big(name: str) -> bool:
    import models
    try:
        args = models.model_args(name)
    except ValueError:
        return False
    return getattr(args, "dim", 0) * getattr(args, "n_layers", 0) >= 2048 * 8


def run_suite(suite: str, *, tiny: bool = False, configs: list[str] | None = None,
              models: list[str] | None = None, threads: int = 2, out_dir: Path | None = RESULTS_DIR,
              name: str | None = None, note: str = "", progress: Progress | None = None,
              command: str | None = None, jobs: list[Job] | None = None,
              budget_s: float | None = None) -> dict[str, Any]:
    """Run a suite (or the given `jobs`) and, with `out_dir`, write ``NAME.json``, ``NAME.md`` and
    ``NAME.png`` there."""
    from benchmarks import report
    if jobs is None:
        jobs = suite_jobs(suite, tiny=tiny, configs=configs, models=models)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if budget_s is None and not tiny:
        budget_s = BUDGET_S[suite]
    rows = run_jobs(jobs, threads=threads, progress=progress, budget_s=budget_s)
    result = {
        "suite": suite + ("-tiny" if tiny else ""), "started": started,
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": command or " ".join(["python -m benchmarks"] + sys.argv[1:]),
        "note": note, "machine": machine_info(threads),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "jobs": [asdict(j) for j in jobs], "rows": rows,
    }
    if out_dir is not None:
        report.write(result, Path(out_dir), name or result["suite"])
    return result
