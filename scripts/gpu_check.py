#!/usr/bin/env python3
"""The GPU paths of sage-llm, checked end to end on one machine, with results as JSON and text (issue 15).

    python3 scripts/gpu_check.py [--out DIR] [--fake] [--budget 240] [--repeat 11] [--top-seconds 5]

Run through scripts/gpu_check.sh on a lent GPU machine (docs/gpu.md, "Verifying on a real GPU"). Stdlib only; the
`sage-llm` commands it runs are the real CLI (`python -m sage_llm`), the engine is the stand-in
tests/fakes/fake_vllm.py whose two children (EngineCore-like, Worker-like) hold 2 GiB and 3 GiB of GPU memory with
torch (tests/fakes/fake_gpu.py). Modes:

  real   an NVIDIA driver is here (its device files and nvidia-smi): everything is checked against the real driver;
  fake   --fake: a fake driver (NVML through scripts/gpu_check_hook/sitecustomize.py, nvidia-smi, memory held in a
         ledger; tests/fakes/fake_gpu.py), so every code path of this script runs on a machine without a GPU;
  nogpu  neither: the GPU checks are "skipped: no GPU"; the lifecycle and the no-driver timing still run.

Each check records pass / fail / skipped with what it measured. Exit 1 when a check failed (all results are written
anyway), 0 otherwise. The whole run keeps to --budget seconds; a step that would overrun is a failure, not a hang.
Results: OUT/gpu-check.json, OUT/gpu-check.txt, plus the raw captures (status, nvidia-smi, top, engine logs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "scripts" / "gpu_check_hook"
FAKES = ROOT / "tests" / "fakes"
GiB = 1024**3
MiB = 1024**2
CHILD_MIB = (2048, 3072)  # what each stand-in engine's two children hold: 5 GiB per engine
OUTPUTS = ("gpu-check.json", "gpu-check.txt", "driver.log", "engine-*.log", "start-gpu-*.txt", "status.json",
           "status.txt", "stop.txt", "top-frame.txt", "doctor.json", "preflight.txt", "nvidia-smi*.txt",
           "gpu-verified.md")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>78]")
CHECKS = ("environment", "doctor_nvml", "gpus0_sets_cuda_visible_devices", "auto_placement", "status_gpus",
          "engine_vram_matches_nvidia_smi", "local_engine_gpu_memory_usage", "status_table_gpu_column",
          "top_gpu_rows", "status_json_timing", "preflight_refuses", "stop_leaves_nothing", "stop_frees_gpu")


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skipped
    summary: str
    values: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- pure evaluations (tested)
def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1.0)


def eval_vram(engine: dict[str, Any], smi_rows: list[tuple[int, int]], tree_pids: set[int], expect_min: int,
              tolerance: float = 0.01) -> tuple[bool, dict[str, Any]]:
    """Does `status --json`'s gpu_memory_bytes for `engine` match nvidia-smi's per-process used memory (MiB) summed
    over the engine's process tree (found independently, from /proc), within `tolerance`, and hold at least what the
    stand-in allocated? A tree nvidia-smi shows nothing for (e.g. another PID namespace) fails: 0 == 0 proves nothing.
    """
    mine = [(pid, mib) for pid, mib in smi_rows if pid in tree_pids]
    smi_bytes = sum(mib for _pid, mib in mine) * MiB
    reported = engine.get("gpu_memory_bytes")
    values = {"engine": engine.get("name"), "gpu_memory_bytes": reported, "nvidia_smi_bytes": smi_bytes,
              "nvidia_smi_rows_of_tree": mine, "tree_pids": sorted(tree_pids), "expected_at_least_bytes": expect_min,
              "foreign_smi_pids": sorted(pid for pid, _m in smi_rows if pid not in tree_pids)}
    ok = isinstance(reported, int) and smi_bytes > 0 and rel_diff(reported, smi_bytes) <= tolerance \
        and reported >= expect_min
    if isinstance(reported, int) and smi_bytes:
        values["relative_difference"] = round(rel_diff(reported, smi_bytes), 5)
    return ok, values


def eval_gpus(doc: dict[str, Any]) -> tuple[bool, list[str]]:
    """Every GPU of `status --json` has name, memory, utilisation, temperature and power; gpu_error is null."""
    problems = []
    if doc.get("gpu_error") is not None:
        problems.append(f"gpu_error is {doc['gpu_error']!r}")
    if not doc.get("gpus"):
        problems.append("gpus[] is empty")
    for g in doc.get("gpus") or []:
        for key in ("uuid", "name", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes",
                    "utilization_percent", "temperature_c", "power_draw_w", "power_limit_w"):
            if g.get(key) is None:
                problems.append(f"GPU {g.get('index')}: {key} is null")
    return not problems, problems


def eval_local_engine(doc: dict[str, Any], port: int) -> tuple[bool, dict[str, Any]]:
    local = doc.get("local_engine") or {}
    eng = next((e for e in doc.get("engines", []) if e.get("port") == port and e.get("managed")), None)
    want = round(eng["gpu_memory_bytes"] / GiB, 2) if eng and isinstance(eng.get("gpu_memory_bytes"), int) else None
    values = {"local_engine": local, "expected_gpu_memory_usage_gb": want}
    ok = local.get("running") is True and local.get("port") == port and want is not None and want > 0 \
        and local.get("gpu_memory_usage") == want
    return ok, values


def eval_preflight(code: int, out: str, err: str, hog_pid: int, engine_names: list[str]) -> tuple[bool, list[str]]:
    lines = err.strip().splitlines()
    problems = []
    if code != 1:
        problems.append(f"exit {code}, expected 1")
    if out.strip():
        problems.append("stdout not empty")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr, expected 1")
    text = err.strip()
    if not text.startswith("Error: GPU 0 has "):
        problems.append("does not start with 'Error: GPU 0 has '")
    if f"pid {hog_pid}" not in text:
        problems.append(f"does not name the process holding the memory (pid {hog_pid})")
    for name in engine_names:
        if f"engine {name!r}" not in text:
            problems.append(f"does not name engine {name!r} on that GPU")
    if "Traceback" in err:
        problems.append("traceback")
    return not problems, problems


def parse_smi_apps(text: str) -> list[tuple[int, int]]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> [(pid, MiB)]."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            rows.append((int(parts[0]), int(parts[1]) if parts[1].isdigit() else 0))
    return rows


def last_frame(raw: bytes) -> str:
    """The last full-screen frame `top` drew, as plain text."""
    text = raw.decode("utf-8", "replace")
    start = text.rfind("sage-llm top ")
    frame = text[start:] if start >= 0 else text
    frame = ANSI.sub("", frame.replace("\r\n", "\n")).replace("\r", "")
    return "\n".join(line.rstrip() for line in frame.splitlines()).strip() + "\n"


def render_markdown(doc: dict[str, Any]) -> str:
    """docs/gpu-verified.md from a gpu-check.json: date, machine, driver, every check, the figures."""
    facts = doc.get("facts") or {}
    checks = {c["name"]: c for c in doc.get("checks", [])}
    val = lambda name: (checks.get(name) or {}).get("values") or {}  # noqa: E731
    out = ["# sage-llm on a real GPU: verification record", ""]
    if doc.get("mode") != "real":
        out += [f"> **Rehearsal ({doc.get('mode')} mode), not a real-GPU result.**", ""]
    out += [f"Generated by `scripts/gpu_check.py` (issue 15) on {doc.get('when')}, {doc.get('duration_s')} s of a "
            f"{doc.get('budget_s')} s budget. Overall: **{'PASS' if doc.get('passed') else 'FAIL'}**.", "",
            "## Machine", ""]
    for g in facts.get("gpus_by_nvidia_smi") or []:
        out.append(f"- GPU {g['index']}: {g['name']}, {g['total_mib']} MiB, driver {g['driver']}, `{g['uuid']}`")
    torch = facts.get("torch") or {}
    out += [f"- {facts.get('cpus')} CPUs ({facts.get('machine')}), kernel {facts.get('kernel')}, "
            f"{facts.get('python')}", f"- torch: {torch.get('info') or torch.get('how')}",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in (facts.get("versions") or {}).items()),
            f"- nvml (doctor): {val('doctor_nvml').get('nvml', {}).get('message')}", "", "## Checks", "",
            "| check | result | what was measured |", "|---|---|---|"]
    for c in doc.get("checks", []):
        out.append(f"| `{c['name']}` | {c['status']} | {c['summary'].replace('|', '/')} |")
    out += ["", "## Figures", ""]
    for name, e in (val("engine_vram_matches_nvidia_smi").get("engines") or {}).items():
        if not isinstance(e, dict):
            continue  # skipped: no GPU
        out.append(f"- VRAM of engine `{name}` (2 + 3 GiB held by its children, plus their CUDA contexts): "
                   f"`status --json` {e.get('gpu_memory_bytes')} B, nvidia-smi over its tree "
                   f"{e.get('nvidia_smi_bytes')} B (relative difference {e.get('relative_difference')})")
    le = val("local_engine_gpu_memory_usage").get("local_engine") or {}
    out.append(f"- `local_engine.gpu_memory_usage`: {le.get('gpu_memory_usage')} GB")
    t = val("status_json_timing")
    if t:
        out.append(f"- `status --json`, median of {t.get('repeat')}: {t.get('median_ms', {}).get('driver')} ms with "
                   f"the driver, {t.get('median_ms', {}).get('no_driver')} ms with it hidden ("
                   + ("no driver here: both runs take the no-driver path" if doc.get("mode") == "nogpu" else
                      f"NVML cost {t.get('nvml_cost_ms')} ms")
                   + f"; min/max {t.get('min_ms')} / {t.get('max_ms')})")
    top = val("top_gpu_rows")
    if top:
        out.append(f"- `top -n 1`: {top.get('frames')} frames in {top.get('seconds')} s, "
                   f"{top.get('cpu_ms_per_frame')} ms CPU per frame ({top.get('cpu_percent_of_one_core')} % of one "
                   f"core; /proc resolution 1/{top.get('clock_ticks_per_s')} s)")
    pre = val("preflight_refuses")
    if pre.get("stderr"):
        out.append(f"- pre-flight refusal: `{pre['stderr'].strip()}`")
    stop = val("stop_frees_gpu")
    if stop:
        before = {str(k): v for k, v in (stop.get("baseline_mib") or {}).items()}
        out.append(f"- after `stop --all`: compute processes {stop.get('compute_apps')}, used MiB "
                   + ", ".join(f"GPU {g['index']} {g['used_mib']} (before {before.get(str(g['index']))})"
                               for g in stop.get("gpus") or []))
    frame = top.get("frame")
    if frame:
        out += ["", "## A `top` frame", "", "```", frame.rstrip(), "```"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------ helpers
def stale_files(package_dir: Path) -> list[str]:
    """Files of this tree's src/sage_llm that the imported sage_llm (`package_dir`) lacks or has otherwise; [] when
    it is src/sage_llm itself (an editable install) or there is no src/ here."""
    src = ROOT / "src" / "sage_llm"
    if not src.is_dir() or package_dir.resolve() == src.resolve():
        return []
    out = []
    for f in sorted(src.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            other = package_dir / f.relative_to(src)
            if not other.is_file() or other.read_bytes() != f.read_bytes():
                out.append(str(f.relative_to(src)))
    return out


def proc_children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc (independent of sage-llm's own tree finding)."""
    kids = proc_children()
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(kids.get(p, []))
    return {p for p in out if Path(f"/proc/{p}").exists()}


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode("utf-8", "replace").split("\0") if "=" in item)


def cpu_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        for pattern in OUTPUTS:  # ours from an earlier run, nothing else
            for old in self.out.glob(pattern):
                old.unlink()
        self.work = Path(tempfile.mkdtemp(prefix="sage-gpu-check-"))
        self.home = self.work / "home"
        self.checks: dict[str, Check] = {}
        self.log_fh = open(self.out / "driver.log", "w")  # closed in finish()
        self.facts: dict[str, Any] = {}
        self.hog: subprocess.Popen | None = None
        self.engine_pids: set[int] = set()
        self.mode = "fake" if args.fake else ("real" if self._driver_here() else "nogpu")
        self.python = sys.executable
        self.env = self._base_env()

    # ---- plumbing
    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s] {msg}"
        self.log_fh.write(line + "\n")
        self.log_fh.flush()
        if self.args.verbose:
            print(line, file=sys.stderr, flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, status: str, summary: str, **values: Any) -> Check:
        check = Check(name, status, summary, values)
        self.checks[name] = check
        self.log(f"CHECK {name}: {status}: {summary}")
        return check

    def _driver_here(self) -> bool:
        markers = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg")  # sage_llm.observe.gpu.DRIVER_MARKERS
        return any(os.path.exists(p) for p in markers) and shutil.which("nvidia-smi") is not None

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in ("SAGE_LLM_VLLM", "VLLM_API_KEY", "SAGE_LOCAL_ENGINE_DEFAULT_MODEL", "SAGE_LOCAL_ENGINE_GPU_UTIL",
                    "SAGE_LOCAL_ENGINE_HOST", "CUDA_VISIBLE_DEVICES", "SAGE_LLM_CHECK_HIDE_DRIVER",
                    "SAGE_LLM_CHECK_FAKE_NVML", "FAKE_GPU_LEDGER", "FAKE_VLLM_CHILDREN", "FAKE_VLLM_FAIL"):
            env.pop(var, None)
        envtool = shutil.which("env") or "/usr/bin/env"
        # the stand-in runs with the machine's own python packages (torch), not the carried ones: no PYTHONPATH
        vllm = [envtool, "-u", "PYTHONPATH", self.python, str(FAKES / "fake_vllm.py")]
        env.update({
            "SAGE_LLM_HOME": str(self.home), "SAGE_LLM_CONFIG": str(self.work / "no-config.toml"),
            "SAGE_LLM_DOTENV": "", "NO_COLOR": "1", "COLUMNS": "200", "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_CACHE": str(self.work / "hf"), "SAGE_LOCAL_ENGINE_PORT": str(free_port()),
            "SAGE_LLM_VLLM": shlex.join(vllm), "FAKE_VLLM_LOAD_S": "0.2",
            "FAKE_VLLM_GPU_MIB": ",".join(map(str, CHILD_MIB)), "PYTHONUNBUFFERED": "1",
        })
        if self.mode == "fake":
            ledger = self.work / "ledger"
            subprocess.run([sys.executable, str(FAKES / "fake_gpu.py"), "init", str(ledger),
                            str(self.args.fake_gpus)], check=True)
            fakebin = self.work / "fakebin"
            fakebin.mkdir()
            smi = fakebin / "nvidia-smi"
            smi.write_text(f"#!/bin/sh\nexec {shlex.quote(self.python)} {shlex.quote(str(FAKES / 'fake_gpu.py'))} "
                           "nvidia-smi \"$@\"\n")
            smi.chmod(0o755)
            env["PATH"] = f"{fakebin}{os.pathsep}{env.get('PATH', '')}"
            env["FAKE_GPU_LEDGER"] = str(ledger)
            env["SAGE_LLM_CHECK_FAKE_NVML"] = str(ledger)
        # the hook is on PYTHONPATH of every `sage-llm` run (it does nothing unless told), so timings compare alike
        env["PYTHONPATH"] = os.pathsep.join([str(HOOK)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                            if p])
        return env

    def run(self, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None,
            name: str | None = None) -> tuple[int, str, str, float]:
        timeout = max(1.0, min(timeout, self.left()))
        t = time.perf_counter()
        try:
            p = subprocess.run(argv, env=env or self.env, capture_output=True, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
            code, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            code = 124
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")) + \
                f"\n[timed out after {timeout:.0f} s]"
        except OSError as exc:
            code, out, err = 127, "", str(exc)
        dt = time.perf_counter() - t
        self.log(f"$ {shlex.join(argv)}  -> exit {code} in {dt:.2f}s" + (f"\n  stderr: {err.strip()[-600:]}"
                                                                           if code and err.strip() else ""))
        if name:
            (self.out / name).write_text(out + (f"\n--- stderr ---\n{err}" if err.strip() else ""))
        return code, out, err, dt

    def sage(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
             name: str | None = None) -> tuple[int, str, str, float]:
        return self.run([self.python, "-m", "sage_llm", *args], timeout=timeout, env=env, name=name)

    def smi(self, *args: str) -> tuple[int, str]:
        code, out, err, _ = self.run(["nvidia-smi", *args], timeout=30)
        return code, out if code == 0 else err

    def smi_gpus(self) -> list[dict[str, Any]]:
        fields = "index,uuid,name,memory.total,memory.used,memory.free,driver_version"
        code, text = self.smi(f"--query-gpu={fields}", "--format=csv,noheader,nounits")
        if code != 0:
            return []
        rows = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 7:
                rows.append({"index": int(parts[0]), "uuid": parts[1], "name": parts[2],
                             "total_mib": int(float(parts[3])), "used_mib": int(float(parts[4])),
                             "free_mib": int(float(parts[5])), "driver": parts[6]})
        return rows

    def smi_apps(self) -> list[tuple[int, int]]:
        code, text = self.smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
        self.last_smi_apps = f"exit {code}\n{text}"
        return parse_smi_apps(text) if code == 0 else []

    def sage_json(self, *args: str, name: str | None = None, timeout: float = 60
                  ) -> tuple[int, dict[str, Any] | None, str]:
        code, out, err, _ = self.sage(*args, name=name, timeout=timeout)
        try:
            return code, json.loads(out), err
        except ValueError:
            return code, None, err or out

    # ---- steps
    def environment(self) -> None:
        import importlib.metadata as md

        versions = {}
        for dist in ("sage-llm", "typer", "rich", "httpx", "psutil", "nvidia-ml-py", "platformdirs", "pydantic",
                     "huggingface_hub"):
            try:
                versions[dist] = md.version(dist)
            except md.PackageNotFoundError:
                versions[dist] = None
        code, out, err, _ = self.run([self.python, "-c", "import sage_llm, sys; print(sage_llm.__file__)"],
                                     env=self.env)
        torch_info: dict[str, Any] = {"how": "fake ledger" if self.mode == "fake" else None}
        if self.mode != "fake":
            probe = ("import json\ntry:\n import torch\nexcept ImportError:\n print(json.dumps(None))\nelse:\n"
                     " ok = torch.cuda.is_available()\n print(json.dumps({'version': torch.__version__, 'cuda': ok,"
                     " 'devices': torch.cuda.device_count() if ok else 0}))")
            env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
            tcode, tout, _terr, tdt = self.run([self.python, "-c", probe], timeout=120, env=env)
            try:
                torch_info = {"info": json.loads(tout.strip().splitlines()[-1]), "probe_s": round(tdt, 2)}
            except (ValueError, IndexError):
                torch_info = {"info": None, "error": (tout + _terr)[-400:]}
        self.facts.update({
            "mode": self.mode, "python": f"{platform.python_implementation()} {platform.python_version()}",
            "executable": self.python, "machine": platform.machine(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "versions": versions,
            "inherited": {v: os.environ.get(v) for v in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")},
            "sage_llm_path": out.strip(), "torch": torch_info,
            "nvidia_smi": shutil.which("nvidia-smi", path=self.env.get("PATH")), "gpus_by_nvidia_smi": self.smi_gpus()
            if self.mode != "nogpu" else [],
        })
        self.torch_cuda = self.mode == "fake" or bool((torch_info.get("info") or {}).get("cuda"))
        if self.mode != "nogpu":
            for name, args in (("nvidia-smi.txt", []), ("nvidia-smi-L.txt", ["-L"])):
                scode, text = self.smi(*args)
                (self.out / name).write_text(text)
                if args:
                    self.facts["nvidia_smi_L"] = text.strip().splitlines()
        problems = []
        if code != 0:
            problems.append(f"sage_llm does not import: {err.strip()[-300:]}")
        stack = "import sage_llm.cli.main, sage_llm.observe.gpu, typer, rich, httpx, psutil, pynvml, platformdirs"
        icode, _iout, ierr, _ = self.run([self.python, "-c", stack], env=self.env)
        if icode != 0:
            problems.append(f"the CLI's imports fail: {ierr.strip().splitlines()[-1:] or icode}")
        stale = stale_files(Path(out.strip()).parent) if code == 0 else []
        self.facts["carried_package_matches_tree"] = not stale
        if stale:
            problems.append(f"the sage_llm imported ({out.strip()}) differs from src/sage_llm of this tree in "
                            f"{len(stale)} file(s), e.g. {stale[:3]}: rebuild it (make gpu-carry)")
        if self.mode != "nogpu" and not self.facts["gpus_by_nvidia_smi"]:
            problems.append("nvidia-smi lists no GPU")
        if self.mode == "real" and not self.torch_cuda:
            problems.append("torch with CUDA is not usable: the stand-in engine cannot hold GPU memory")
        self.record("environment", "fail" if problems else "pass", "; ".join(problems) or
                    f"mode {self.mode}, sage-llm {versions['sage-llm']}, {len(self.facts['gpus_by_nvidia_smi'])} GPU(s)"
                    f" by nvidia-smi", **self.facts)
        if code != 0:
            raise SystemExit("sage_llm cannot be imported; nothing else can run")

    def doctor(self) -> None:
        code, doc, err = self.sage_json("doctor", "--json", name="doctor.json")
        checks = {c.get("name"): c for c in (doc or {}).get("checks", [])}
        nvml = checks.get("nvml") or {}
        values = {"doctor_exit": code, "nvml": nvml, "gpu_checks": {k: v for k, v in checks.items()
                                                                    if k.startswith("gpu")}}
        if self.mode == "nogpu":
            ok = nvml.get("status") == "warn" and "no NVIDIA driver" in str(nvml.get("message"))
            self.record("doctor_nvml", "skipped" if ok else "fail", "skipped: no GPU (doctor says so)" if ok else
                        f"doctor's nvml line without a driver: {nvml}", **values)
            return
        drivers = {g["driver"] for g in self.facts["gpus_by_nvidia_smi"]}
        problems = []
        if nvml.get("status") != "ok":
            problems.append(f"nvml: {nvml.get('status')}: {nvml.get('message')}")
        if not any(f"driver {d}" in str(nvml.get("message")) for d in drivers):
            problems.append(f"nvml line does not give the driver version nvidia-smi reports ({sorted(drivers)})")
        for g in self.facts["gpus_by_nvidia_smi"]:
            if (checks.get(f"gpu{g['index']}") or {}).get("status") not in ("ok", "warn"):
                problems.append(f"no doctor line for GPU {g['index']}")
        self.record("doctor_nvml", "fail" if problems else "pass", "; ".join(problems) or str(nvml.get("message")),
                    **values)

    def start_engines(self) -> None:
        gpus = self.facts["gpus_by_nvidia_smi"]
        self.baseline = {g["index"]: g["used_mib"] for g in gpus}
        self.engines: dict[str, dict[str, Any]] = {}
        gpu_mode = self.mode != "nogpu"
        # engine A: --gpus 0
        args = ["start", "stand-in/model-a", "--name", "gpu-a", "-u", "0.1", "--json", "--timeout", "120"]
        code, doc, err = self.sage_json(*args, *(["--gpus", "0"] if gpu_mode else []), name="start-gpu-a.txt",
                                        timeout=150)
        if doc and doc.get("pid"):
            self.engines["gpu-a"] = doc
            self.engine_pids |= descendants(doc["pid"])
        if not gpu_mode:
            self.record("gpus0_sets_cuda_visible_devices", "skipped", "skipped: no GPU",
                        start_exit=code, start_stderr=err.strip()[-300:])
        else:
            self._check_pinned(code, doc, err, gpus)
        # engine B: automatic placement
        expect = sorted(gpus, key=lambda g: (-g["free_mib"], g["index"]))[0]["index"] if gpus else None
        fresh = {g["index"]: g for g in self.smi_gpus()} if gpu_mode else {}
        if fresh:
            expect = sorted(fresh.values(), key=lambda g: (-g["free_mib"], g["index"]))[0]["index"]
        code, doc, err = self.sage_json("start", "stand-in/model-b", "--name", "gpu-b", "-u", "0.1", "--json",
                                        "--timeout", "120", name="start-gpu-b.txt", timeout=150)
        if doc and doc.get("pid"):
            self.engines["gpu-b"] = doc
            self.engine_pids |= descendants(doc["pid"])
        if not gpu_mode:
            self.record("auto_placement", "skipped", "skipped: no GPU", start_exit=code,
                        gpus_in_start_json=(doc or {}).get("gpus"))
            return
        problems = []
        placed = (doc or {}).get("gpus") or []
        uuid = next((g["uuid"] for g in gpus if g["index"] == expect), None)
        if code != 0 or not doc:
            problems.append(f"start exit {code}: {err.strip()[-300:]}")
        elif [(g.get("index"), g.get("chosen_by")) for g in placed] != [(expect, "auto")]:
            problems.append(f"placed on {placed}, expected GPU {expect} chosen_by auto")
        envs = self._tree_env(doc)
        if doc and (len(envs) < 1 + len(CHILD_MIB) or any(v != uuid for v in envs.values())):
            problems.append(f"CUDA_VISIBLE_DEVICES in the tree: {envs}, expected {uuid}")
        self.record("auto_placement", "fail" if problems else "pass", "; ".join(problems) or
                    f"automatic placement chose GPU {expect} (most free memory), CUDA_VISIBLE_DEVICES={uuid}",
                    expected_index=expect, gpus_in_start_json=placed, cuda_visible_devices_in_tree=envs,
                    free_mib_before=[(g["index"], g["free_mib"]) for g in fresh.values()])

    def _tree_env(self, doc: dict[str, Any] | None) -> dict[int, str | None]:
        if not doc or not doc.get("pid"):
            return {}
        return {pid: environ_of(pid).get("CUDA_VISIBLE_DEVICES") for pid in sorted(descendants(doc["pid"]))}

    def _check_pinned(self, code: int, doc: dict[str, Any] | None, err: str, gpus: list[dict[str, Any]]) -> None:
        uuid0 = next((g["uuid"] for g in gpus if g["index"] == 0), None)
        problems = []
        placed = (doc or {}).get("gpus") or []
        if code != 0 or not doc:
            problems.append(f"start --gpus 0 exit {code}: {err.strip()[-300:]}")
        elif [(g.get("index"), g.get("uuid"), g.get("chosen_by")) for g in placed] != [(0, uuid0, "--gpus")]:
            problems.append(f"start --json gpus = {placed}, expected GPU 0 {uuid0} chosen_by --gpus")
        envs = self._tree_env(doc)
        if doc and (len(envs) < 1 + len(CHILD_MIB) or any(v != uuid0 for v in envs.values())):
            problems.append(f"CUDA_VISIBLE_DEVICES per process of the tree: {envs}, expected {uuid0} in "
                            f"{1 + len(CHILD_MIB)} processes")
        self.record("gpus0_sets_cuda_visible_devices", "fail" if problems else "pass", "; ".join(problems) or
                    f"--gpus 0 gave CUDA_VISIBLE_DEVICES={uuid0} to all {len(envs)} processes of the engine",
                    gpus_in_start_json=placed, cuda_visible_devices_in_tree=envs, nvidia_smi_uuid0=uuid0)

    def status_checks(self) -> None:
        code, doc, err = self.sage_json("status", "--json", name="status.json")
        tcode, text, terr, _ = self.sage("status", name="status.txt")
        smi_rows = self.smi_apps() if self.mode != "nogpu" else []
        (self.out / "nvidia-smi-compute-apps.txt").write_text(getattr(self, "last_smi_apps", "not run (no GPU)\n"))
        if doc is None:
            for name in ("status_gpus", "engine_vram_matches_nvidia_smi", "local_engine_gpu_memory_usage"):
                self.record(name, "fail", f"status --json exit {code}, not JSON: {err.strip()[-300:]}")
            return
        if self.mode == "nogpu":
            self.record("status_gpus", "skipped", "skipped: no GPU", gpus=doc.get("gpus"),
                        gpu_error=doc.get("gpu_error"))
            self.record("engine_vram_matches_nvidia_smi", "skipped", "skipped: no GPU",
                        engines={e.get("name"): e.get("gpu_memory_bytes") for e in doc.get("engines", [])})
            self.record("local_engine_gpu_memory_usage", "skipped", "skipped: no GPU",
                        local_engine=doc.get("local_engine"))
            self.record("status_table_gpu_column", "skipped", "skipped: no GPU", status_text=text)
            return
        ok, problems = eval_gpus(doc)
        self.record("status_gpus", "pass" if ok else "fail", "; ".join(problems) or
                    f"{len(doc['gpus'])} GPU(s) with every field, gpu_error null", gpus=doc.get("gpus"),
                    gpu_error=doc.get("gpu_error"))
        if not self.torch_cuda:
            self.record("engine_vram_matches_nvidia_smi", "skipped", "skipped: no torch with CUDA to hold memory")
        else:
            per: dict[str, Any] = {}
            all_ok = bool(self.engines)
            for name, started in self.engines.items():
                eng = next((e for e in doc["engines"] if e.get("name") == name and e.get("managed")), {"name": name})
                ok, values = eval_vram(eng, smi_rows, descendants(started["pid"]), sum(CHILD_MIB) * MiB)
                values["gpus"] = eng.get("gpus")
                values["ok"] = ok
                per[name] = values
                all_ok = all_ok and ok
            summary = ", ".join(f"{n}: sage {v['gpu_memory_bytes']} B vs nvidia-smi {v['nvidia_smi_bytes']} B"
                                for n, v in per.items())
            self.record("engine_vram_matches_nvidia_smi", "pass" if all_ok else "fail", summary or "no engine",
                        engines=per, nvidia_smi_rows=smi_rows)
        port = int(self.env["SAGE_LOCAL_ENGINE_PORT"])
        ok, values = eval_local_engine(doc, port)
        self.record("local_engine_gpu_memory_usage", "pass" if ok else "fail",
                    f"local_engine.gpu_memory_usage = {values['local_engine'].get('gpu_memory_usage')} GB, expected "
                    f"{values['expected_gpu_memory_usage_gb']}", port=port, **values)
        lines = text.splitlines()
        row_ok = tcode == 0 and bool(lines) and bool(self.engines) and "GPU MEM" in lines[0] and all(
            any(line.startswith(n) and re.search(r"\d+\.\d GiB on \d", line) for line in lines) for n in self.engines)
        self.record("status_table_gpu_column", "pass" if row_ok else "fail",
                    "`status` shows GPU MEM per engine" if row_ok else f"`status` exit {tcode}: GPU MEM column or "
                    f"rows missing", status_text=text, stderr=terr.strip()[-300:])

    def top_check(self) -> None:
        seconds = self.args.top_seconds
        master, slave = pty.openpty()
        env = {**self.env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
        env.pop("NO_COLOR", None)
        proc = subprocess.Popen([self.python, "-m", "sage_llm", "top", "-n", "1"], stdin=slave, stdout=slave,
                                stderr=slave, env=env, close_fds=True, start_new_session=True)
        raw = bytearray()
        marks: list[tuple[float, int | None]] = []  # (when, cpu ticks) at each frame

        def drain(stop: threading.Event) -> None:
            while not stop.is_set():
                ready, _, _ = select.select([master], [], [], 0.1)
                if not ready:
                    continue
                try:
                    data = os.read(master, 65536)
                except OSError:
                    return
                if not data:
                    return
                raw.extend(data)
                for _ in range(data.count(b"sage-llm top ")):
                    marks.append((time.monotonic(), cpu_ticks(proc.pid)))

        stop = threading.Event()
        reader = threading.Thread(target=drain, args=(stop,), daemon=True)
        reader.start()
        t_start = time.monotonic()
        deadline = t_start + min(60.0, max(5.0, self.left() - 30))
        while not marks and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        first_at = marks[0][0] if marks else None
        if first_at is not None:
            time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))
        end_ticks, end_at, frames_seen = cpu_ticks(proc.pid), time.monotonic(), len(marks)
        try:
            os.write(master, b"q")
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        time.sleep(0.2)
        stop.set()
        reader.join(timeout=2)
        os.close(slave)
        os.close(master)
        frame = last_frame(bytes(raw))
        (self.out / "top-frame.txt").write_text(frame)
        tick = os.sysconf("SC_CLK_TCK")
        values: dict[str, Any] = {"exit": code, "frames": frames_seen, "seconds": seconds,
                                  "startup_to_first_frame_s": round(first_at - t_start, 2) if first_at else None}
        if frames_seen >= 2 and marks[0][1] is not None and end_ticks is not None:
            cpu_s = (end_ticks - marks[0][1]) / tick
            span = end_at - marks[0][0]
            values.update(cpu_s_after_first_frame=round(cpu_s, 3), wall_s=round(span, 2),
                          cpu_ms_per_frame=round(1000 * cpu_s / (frames_seen - 1), 1),
                          cpu_percent_of_one_core=round(100 * cpu_s / span, 2), clock_ticks_per_s=tick)
        problems = [] if self.engines else ["no engine was started"]
        if code != 0:
            problems.append(f"top exit {code}")
        if frames_seen < max(2, int(seconds * 0.6)):
            problems.append(f"{frames_seen} frames in {seconds} s at -n 1")
        if "Traceback" in frame:
            problems.append("traceback in the frame")
        for name in self.engines:
            if name not in frame:
                problems.append(f"engine {name} not in the frame")
        if self.mode == "nogpu":
            if "No GPU:" not in frame:
                problems.append("no 'No GPU:' line")
            self.record("top_gpu_rows", "fail" if problems else "skipped",
                        "; ".join(problems) or "skipped: no GPU (the frame says why; CPU cost measured)",
                        frame=frame, **values)
            return
        for g in self.facts["gpus_by_nvidia_smi"]:
            short = g["name"].replace("NVIDIA ", "")
            if not any(line.startswith(f"{g['index']} ") and short[:20] in line and "/" in line
                       for line in frame.splitlines()):
                problems.append(f"no row for GPU {g['index']} ({short})")
        self.record("top_gpu_rows", "fail" if problems else "pass", "; ".join(problems) or
                    f"{frames_seen} frames, GPU rows drawn, {values.get('cpu_ms_per_frame')} ms CPU per frame",
                    frame=frame, **values)

    def timing(self) -> None:
        repeat = self.args.repeat
        hidden_env = {**self.env, "SAGE_LLM_CHECK_HIDE_DRIVER": "1"}
        runs: dict[str, list[float]] = {"driver": [], "no_driver": []}
        docs: dict[str, Any] = {}
        bad = []
        for _ in range(repeat):  # interleaved, so drift in machine load hits both alike
            for label, env in (("driver", self.env), ("no_driver", hidden_env)):
                if self.left() < 20:
                    bad.append("time budget spent")
                    break
                code, out, err, dt = self.sage("status", "--json", env=env)
                runs[label].append(dt)
                try:
                    docs[label] = json.loads(out)
                except ValueError:
                    bad.append(f"{label}: exit {code}, not JSON: {err.strip()[-200:]}")
                if code != 0:
                    bad.append(f"{label}: exit {code}")
        med = {k: round(statistics.median(v) * 1000, 1) if v else None for k, v in runs.items()}
        values = {"repeat": repeat, "median_ms": med,
                  "min_ms": {k: round(min(v) * 1000, 1) if v else None for k, v in runs.items()},
                  "max_ms": {k: round(max(v) * 1000, 1) if v else None for k, v in runs.items()},
                  "runs_ms": {k: [round(x * 1000, 1) for x in v] for k, v in runs.items()}}
        if med["driver"] is not None and med["no_driver"] is not None:
            values["nvml_cost_ms"] = round(med["driver"] - med["no_driver"], 1)
        hidden = docs.get("no_driver") or {}
        if hidden.get("gpus") != [] or "no NVIDIA driver" not in str(hidden.get("gpu_error")):
            bad.append(f"the no-driver runs did not take the no-driver path (gpu_error {hidden.get('gpu_error')!r})")
        if self.mode == "nogpu":
            self.record("status_json_timing", "fail" if bad else "skipped", "; ".join(bad) or
                        f"skipped: no GPU (no driver: median {med['no_driver']} ms of {repeat})", **values)
            return
        real = docs.get("driver") or {}
        if not real.get("gpus") or real.get("gpu_error") is not None:
            bad.append(f"the driver runs saw no GPU (gpu_error {real.get('gpu_error')!r})")
        self.record("status_json_timing", "fail" if bad else "pass", "; ".join(dict.fromkeys(bad)) or
                    f"status --json median of {repeat}: {med['driver']} ms with the driver, {med['no_driver']} ms "
                    f"without", **values)

    def preflight(self) -> None:
        if self.mode == "nogpu":
            code, out, err, _ = self.sage("start", "stand-in/model-c", "--gpus", "0", "--json")
            ok = code == 2 and "no GPU is usable here" in err and not out.strip()
            self.record("preflight_refuses", "skipped" if ok else "fail",
                        "skipped: no GPU (`start --gpus 0` is refused with exit 2, as it should be)" if ok else
                        f"`start --gpus 0` without a GPU: exit {code}: {err.strip()[-300:]}", exit=code, stderr=err)
            return
        if not self.torch_cuda:
            self.record("preflight_refuses", "skipped", "skipped: no torch with CUDA to fill the GPU")
            return
        g0 = next((g for g in self.smi_gpus() if g["index"] == 0), None)
        if g0 is None:
            self.record("preflight_refuses", "fail", "nvidia-smi does not list GPU 0")
            return
        # leave about 35 % free, then ask for 50 %
        hog_bytes = (g0["free_mib"] - int(0.35 * g0["total_mib"])) * MiB
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        env["CUDA_VISIBLE_DEVICES"] = g0["uuid"]
        self.hog = subprocess.Popen([self.python, str(FAKES / "fake_gpu.py"), "hold", str(hog_bytes)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        ready, _, _ = select.select([self.hog.stdout], [], [], max(1.0, min(120.0, self.left() - 40)))
        said = self.hog.stdout.readline().split() if ready and self.hog.stdout else []
        if said[:2] not in (["HOLDING", "torch"], ["HOLDING", "ledger"]):
            err = self.hog.stderr.read() if self.hog.poll() is not None and self.hog.stderr else ""
            self.record("preflight_refuses", "fail", f"the helper could not hold {hog_bytes} bytes: {said} "
                        f"{err[-300:]}")
            return
        after = next((g for g in self.smi_gpus() if g["index"] == 0), {})
        names_before = self._recorded_names()
        code, out, err, _ = self.sage("start", "stand-in/model-c", "--name", "gpu-c", "--gpus", "0", "-u", "0.5",
                                      "--timeout", "60", name="preflight.txt")
        on_gpu0 = [n for n, d in self.engines.items() if any(g.get("index") == 0 for g in d.get("gpus") or [])]
        ok, problems = eval_preflight(code, out, err, self.hog.pid, on_gpu0)
        names_after = self._recorded_names()
        if names_after != names_before:
            problems.append(f"engine records changed: {names_before} -> {names_after}")
        started = [p for p in self._all_cmdlines() if "stand-in/model-c" in p]
        if started:
            problems.append(f"a process of the refused engine runs: {started}")
        self.record("preflight_refuses", "fail" if problems else "pass", "; ".join(problems) or
                    f"refused in one line naming pid {self.hog.pid} and {on_gpu0}", stderr=err.strip(), exit=code,
                    hog_pid=self.hog.pid, hog_bytes=hog_bytes, gpu0_before=g0, gpu0_with_hog=after)
        self._stop_hog()

    def _stop_hog(self) -> None:
        if self.hog is not None and self.hog.poll() is None:
            self.hog.terminate()
            try:
                self.hog.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.hog.kill()
                self.hog.wait()
        self.hog = None

    def _recorded_names(self) -> list[str]:
        engines = self.home / "engines"
        return sorted(p.stem for p in engines.glob("*.json")) if engines.is_dir() else []

    def _all_cmdlines(self) -> list[str]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    out.append(Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
        return out

    def stop_checks(self) -> None:
        code, out, err, dt = self.sage("stop", "--all", "--json", "--timeout", "30", timeout=90, name="stop.txt")
        deadline = time.monotonic() + min(30.0, max(1.0, self.left() - 5))
        left_procs = sorted(p for p in self.engine_pids if alive(p))
        while left_procs and time.monotonic() < deadline:
            time.sleep(0.2)
            left_procs = sorted(p for p in self.engine_pids if alive(p))
        problems = [] if code == 0 else [f"stop --all exit {code}: {err.strip()[-300:]}"]
        if left_procs:
            problems.append(f"processes left: {left_procs}")
        if not self.engine_pids:
            problems.append("no engine was started")
        self.record("stop_leaves_nothing", "fail" if problems else "pass", "; ".join(problems) or
                    f"stop --all in {dt:.2f} s; all {len(self.engine_pids)} processes of the engines are gone",
                    stop_exit=code, pids=sorted(self.engine_pids), left=left_procs)
        if self.mode == "nogpu":
            self.record("stop_frees_gpu", "skipped", "skipped: no GPU")
            return
        apps, gpus = self.smi_apps(), self.smi_gpus()
        while time.monotonic() < deadline and (apps or any(self._over(g) for g in gpus)):
            time.sleep(0.5)
            apps, gpus = self.smi_apps(), self.smi_gpus()
        problems = [] if self.engine_pids else ["no engine was started"]
        if apps:
            problems.append(f"nvidia-smi still lists compute processes: {apps}")
        for g in gpus:
            if self._over(g):
                problems.append(f"GPU {g['index']} uses {g['used_mib']} MiB, {self.baseline.get(g['index'])} MiB "
                                "before the engines")
        self.record("stop_frees_gpu", "fail" if problems else "pass", "; ".join(problems) or
                    "no compute process on any GPU; memory back to " +
                    ", ".join(f"GPU {g['index']}: {g['used_mib']} MiB (before: {self.baseline.get(g['index'])})"
                              for g in gpus), compute_apps=apps, gpus=gpus, baseline_mib=self.baseline)

    def _over(self, g: dict[str, Any]) -> bool:
        base = self.baseline.get(g["index"])
        return base is None or g["used_mib"] > base + max(256, g["total_mib"] // 200)

    # ---- run it all
    def main(self) -> int:
        steps = [("environment", self.environment), ("doctor", self.doctor), ("start", self.start_engines),
                 ("status", self.status_checks),
                 ("top", self.top_check), ("timing", self.timing), ("preflight", self.preflight),
                 ("stop", self.stop_checks)]
        try:
            for label, step in steps:
                if self.left() < 15:
                    self.log(f"time budget spent before step {label}")
                    break
                try:
                    step()
                except SystemExit:
                    raise
                except Exception as exc:  # a bug in a step is one failure, not the end of the run
                    import traceback

                    self.log(traceback.format_exc())
                    self.record(f"step_{label}", "fail", f"{type(exc).__name__}: {exc}")
        finally:
            self.cleanup()
            self.finish()
        return 0 if all(c.status != "fail" for c in self.checks.values()) else 1

    def cleanup(self) -> None:
        self._stop_hog()
        if any(alive(p) for p in self.engine_pids):
            self.run([self.python, "-m", "sage_llm", "stop", "--all", "--force"], timeout=30)
        for pid in self.engine_pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        logs = self.home / "logs"
        if logs.is_dir():
            for f in logs.glob("*.log"):
                shutil.copy(f, self.out / f"engine-{f.name}")

    def finish(self) -> None:
        for name in CHECKS:
            if name not in self.checks:
                self.record(name, "fail", "not run (an earlier step failed or the time budget was spent)")
        checks = [asdict(c) for c in self.checks.values()]
        passed = all(c["status"] != "fail" for c in checks)
        doc = {"schema": 1, "mode": self.mode, "passed": passed, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                      time.gmtime()),
               "duration_s": round(time.monotonic() - self.t0, 1), "budget_s": self.args.budget, "facts": self.facts,
               "checks": checks}
        (self.out / "gpu-check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        lines = [f"sage-llm GPU check: {'PASS' if passed else 'FAIL'}  mode={self.mode}  {doc['when']}  "
                 f"{doc['duration_s']} s", ""]
        for g in self.facts.get("gpus_by_nvidia_smi") or []:
            lines.append(f"GPU {g['index']}: {g['name']}, {g['total_mib']} MiB, driver {g['driver']}, {g['uuid']}")
        lines.append(f"python {self.facts.get('python')}, torch {self.facts.get('torch')}")
        lines.append("")
        for c in checks:
            lines.append(f"{c['status'].upper():8} {c['name']}: {c['summary']}")
        (self.out / "gpu-check.txt").write_text("\n".join(lines) + "\n")
        (self.out / "gpu-verified.md").write_text(render_markdown(json.loads(json.dumps(doc, default=str))))
        print("\n".join(lines))
        self.log_fh.close()
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder ($OUT)")
    ap.add_argument("--fake", action="store_true", help="fake driver and GPU memory (no GPU needed)")
    ap.add_argument("--fake-gpus", type=int, default=2, help="number of fake GPUs (--fake)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--repeat", type=int, default=11, help="status --json runs per timing variant")
    ap.add_argument("--top-seconds", type=float, default=5.0, help="seconds of `top -n 1` to capture")
    ap.add_argument("-v", "--verbose", action="store_true", help="log each step on stderr")
    args = ap.parse_args(argv)
    return Runner(args).main()


if __name__ == "__main__":
    sys.exit(main())
