"""bench/gpu_check.sh's bookkeeping: one JSON for the whole check, one record per step.

    python bench/gpu_check_merge.py init --json OUT.json --steps env pytest_gpu ... [--dry-run]
    python bench/gpu_check_merge.py env --out env.json            # the environment step itself
    python bench/gpu_check_merge.py record --json OUT.json --step NAME --rc 0 --figures F ...
    python bench/gpu_check_merge.py summary --json OUT.json       # the table printed at the end
    python bench/gpu_check_merge.py mmdit-yaml DEST.yaml          # SD3-medium MMDiT at 64² latents

`record` reads what the step wrote (a bench's --json, pytest's JUnit XML, the env probe) and
adds it to the one JSON with the step's status: ok, failed, timeout (exit 124/137 from
`timeout`) or skipped (with the reason: no CUDA, the time budget, --only, or pytest's own skip
reason when every test skipped). The JSON is rewritten after each step, so a run killed midway
still leaves every finished step's figures. Needs only the standard library, except `env`
(torch) and `mmdit-yaml` (omegaconf).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parents[1] / "conf"
# Packages the steps import; reported by the env step, None where missing (on the GPU image,
# missing ones travel as wheels: docs/performance.md#gpu-check-benchgpu_checksh).
PACKAGES = [
    "torch",
    "lightning",
    "hydra-core",
    "omegaconf",
    "deepspeed",
    "diffusers",
    "peft",
    "kornia",
    "webdataset",
    "transformers",
    "open_clip_torch",
    "scikit-learn",
    "safetensors",
    "pytest",
    "pytest-xdist",
    "triton",
]
TRAIN_KEYS = [
    "config",
    "batch",
    "oom",
    "params_m",
    "dtype",
    "compile",
    "compiled",
    "compile_s",
    "channels_last",
    "grad_checkpointing",
    "optimizer",
    "sec_per_step",
    "img_per_s",
    "peak_mem_mb",
    "gflop_per_step",
    "achieved_tflops",
    "mfu",
    "dynamo",
]
TAIL = 3000


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# --- the environment step ---------------------------------------------------------------------


def nvidia_smi() -> dict[str, Any] | str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "skipped (no nvidia-smi)"
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit,pstate"
    out: dict[str, Any] = {}
    for key, args in (("query", [f"--query-gpu={query}", "--format=csv,noheader"]), ("text", [])):
        try:
            proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
            out[key] = (proc.stdout + proc.stderr).strip()[-4000:]
        except (OSError, subprocess.TimeoutExpired) as e:
            out[key] = f"error: {e}"
    return out


def env_figures() -> dict[str, Any]:
    import torch

    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    fig: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": versions,
        "missing_packages": [k for k, v in versions.items() if v is None],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fig.update(
            device_count=torch.cuda.device_count(),
            device_name=torch.cuda.get_device_name(0),
            capability=list(torch.cuda.get_device_capability(0)),
            total_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
            cudnn=torch.backends.cudnn.version(),
            nvidia_smi=nvidia_smi(),
        )
    else:
        fig.update(
            device_name="skipped (no CUDA)",
            capability="skipped (no CUDA)",
            total_memory_gib="skipped (no CUDA)",
            nvidia_smi="skipped (no CUDA)",
        )
    return fig


# --- reading what a step wrote ----------------------------------------------------------------


def junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    tests = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            outcome, message = "passed", None
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (el.get("message") or el.text or "")[:500]
                    break
            tests.append(
                {
                    "test": case.get("name"),
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0) or 0),
                    "message": message,
                }
            )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "cases": tests}


def train_summary(fig: dict[str, Any]) -> dict[str, Any]:
    rows = [{k: r.get(k) for k in TRAIN_KEYS if k in r} for r in fig.get("rows", [])]
    return {"rows": rows, "inference": fig.get("inference", [])}


def sample_summary(fig: list[dict[str, Any]]) -> dict[str, Any]:
    keep = [
        "config",
        "experts",
        "batch",
        "steps",
        "single_s_per_step",
        "ensemble_s_per_step",
        "ratio",
        "peak_mb",
        "offload_s_per_step",
        "offload_ratio",
        "offload_peak_mb",
        "offload_transfers",
    ]
    out: dict[str, Any] = {k: fig[0].get(k) for k in keep} if fig else {}
    lora = [r for r in fig if "lora_rank" in r]
    if lora:
        out["lora"] = lora[0]
    return out


def degrade_summary(fig: dict[str, Any]) -> dict[str, Any]:
    keep = ["device", "name", "batch", "size", "out_size", "samples_per_s", "ms_per_sample"]
    return {"rows": [{k: r.get(k) for k in keep} for r in fig.get("rows", [])]}


def verdict(kind: str, fig: Any) -> tuple[str, str | None]:
    """(status, reason) from what an exit-0 step wrote."""
    if kind == "pytest":
        if fig["tests"] == 0:
            return "failed", "no tests ran"
        if fig["failures"] or fig["errors"]:
            return "failed", f"{fig['failures']} failed, {fig['errors']} errors"
        if fig["skipped"] == fig["tests"]:
            reasons = {c["message"] for c in fig["cases"] if c["message"]}
            return "skipped", "; ".join(sorted(reasons)) or "every test skipped"
        return "ok", None
    if kind == "compile":
        rows = [r for r in fig.get("rows", []) if r.get("compile") and not r.get("oom")]
        if not rows:
            return "failed", "no compiled row (out of memory?)"
        bad = [
            r for r in rows if not r.get("compiled") or not (r.get("dynamo") or {}).get("frames_ok")
        ]
        if bad:
            err = bad[0].get("compile_error") or "dynamo compiled no frame"
            return "failed", f"compiled row ran eager: {err}"
        return "ok", None
    if kind in ("train", "sr"):
        rows = fig.get("rows", [])
        if rows and all(r.get("oom") for r in rows):
            return "failed", "every row ran out of memory"
        return ("ok", None) if rows else ("failed", "no rows")
    return "ok", None


def record(a: argparse.Namespace) -> None:
    data = load(a.json)
    rec: dict[str, Any] = {
        "name": a.step,
        "plan_step": a.plan,
        "title": a.title,
        "status": a.status,
        "reason": a.reason,
        "rc": a.rc,
        "seconds": a.seconds,
        "timeout_s": a.timeout,
        "command": a.cmd,
        "figures": None,
        "summary": None,
    }
    if a.cuda_parts and a.rc is not None:  # what this run could not measure
        why = "skipped (no CUDA)" if not data.get("cuda") else "skipped (dry run)"
        if not data.get("cuda") or data.get("dry_run"):
            rec["cuda_only"] = {p.strip(): why for p in a.cuda_parts.split(";") if p.strip()}
    out = Path(a.output) if a.output else None
    if out is not None and out.is_file():
        rec["output_tail"] = out.read_text(errors="replace")[-TAIL:]
    if a.rc is not None:  # it ran: the exit status, then what it wrote
        fig: Any = None
        wrote = Path(a.figures) if a.figures else None
        if wrote is not None and wrote.is_file() and wrote.stat().st_size:
            try:
                fig = junit(wrote) if a.kind == "pytest" else load(wrote)
            except (ValueError, ET.ParseError) as e:
                rec["reason"] = f"unreadable figures: {e}"
        rec["figures"] = fig
        if a.rc in (124, 137):
            rec["status"], rec["reason"] = "timeout", f"killed after {a.timeout} s"
        elif a.rc != 0 and not (a.kind == "pytest" and a.rc == 1 and fig):
            rec["status"], rec["reason"] = "failed", f"exit status {a.rc}"
        elif fig is None:
            rec["status"], rec["reason"] = "failed", rec["reason"] or "no figures written"
        else:
            rec["status"], rec["reason"] = verdict(a.kind, fig)
        if fig is not None:
            try:
                rec["summary"] = {
                    "train": train_summary,
                    "compile": train_summary,
                    "sr": train_summary,
                    "sample": sample_summary,
                    "degrade": degrade_summary,
                }.get(a.kind, lambda f: None)(fig)
            except (AttributeError, KeyError, IndexError, TypeError) as e:
                rec["summary"] = f"could not summarise: {e}"
        if a.kind == "pytest" and fig:
            rec["summary"] = {k: fig[k] for k in ("tests", "passed", "failures", "errors")}
            rec["summary"]["skipped"] = fig["skipped"]
        if a.kind == "env" and fig:
            data["cuda"] = bool(fig.get("cuda_available"))
            data["device"] = fig.get("device_name")
    data["steps"][a.step] = rec
    data["updated"] = now()
    save(a.json, data)


# --- the printed summary ----------------------------------------------------------------------


def _f(v: Any, fmt: str = ".1f") -> str:
    return "-" if v is None else (format(v, fmt) if isinstance(v, (int, float)) else str(v))


def figures_line(rec: dict[str, Any]) -> list[str]:
    s, fig = rec.get("summary"), rec.get("figures")
    lines: list[str] = []
    if rec["name"] == "env" and isinstance(fig, dict):
        line = (
            f"python {fig.get('python')}, torch {fig.get('torch')} (CUDA {fig.get('torch_cuda')})"
        )
        if fig.get("cuda_available"):
            line += (
                f", {fig.get('device_name')}, capability {fig.get('capability')}, "
                f"{_f(fig.get('total_memory_gib'))} GiB"
            )
        missing = ", ".join(fig.get("missing_packages") or []) or "none"
        lines.append(f"{line}; packages missing: {missing}")
    if not isinstance(s, dict):
        return lines
    for r in s.get("rows", []):
        if "img_per_s" in r or r.get("oom"):
            if r.get("oom"):
                lines.append(f"{r['config']} batch {r['batch']}: out of memory")
                continue
            flags = [k for k in ("compiled", "channels_last") if r.get(k)]
            flags += [] if r.get("grad_checkpointing") else ["no-ckpt"]
            d = r.get("dynamo")
            dyn = (
                f", dynamo frames {d['frames_ok']}/{d['frames_total']} breaks {d['graph_breaks']}"
                if d
                else ""
            )
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(
                f"{r['config']} b{r['batch']} {'+'.join(flags) or 'eager'}: "
                f"{_f(r.get('img_per_s'))} img/s, {_f(r.get('sec_per_step'), '.4f')} s/step, "
                f"peak {_f(r.get('peak_mem_mb'), '.0f')} MB, MFU {mfu}{dyn}"
            )
        elif "samples_per_s" in r:
            lines.append(f"degrade {r['device']}: {_f(r['samples_per_s'])} samples/s")
    for r in s.get("inference", []):
        lines.append(
            f"inference {r['config']} at {r['size']}²: {_f(r['sec_per_call'], '.3f')} s/call, "
            f"peak {_f(r['peak_mem_mb'], '.0f')} MB"
        )
    if "ratio" in s:
        lines.append(
            f"ensemble/single {_f(s['ratio'], '.3f')}, peak {_f(s.get('peak_mb'), '.0f')} MB; "
            f"offload ratio {_f(s.get('offload_ratio'), '.3f')}, "
            f"peak {_f(s.get('offload_peak_mb'), '.0f')} MB"
        )
    if "lora" in s:
        lo = s["lora"]
        lines.append(
            f"LoRA rank {lo['lora_rank']}: ratio {_f(lo['lora_ratio'], '.3f')}, "
            f"{_f(lo['full_copies_mb'])} MB full copies vs {_f(lo['base_plus_adapters_mb'])} MB"
        )
    if "tests" in s:
        lines.append(
            f"{s['tests']} tests: {s['passed']} passed, {s['failures']} failed, "
            f"{s['errors']} errors, {s['skipped']} skipped"
        )
    return lines


def summary(a: argparse.Namespace) -> None:
    data = load(a.json)
    mode = "dry run (CPU, tiny sizes)" if data.get("dry_run") else "GPU run"
    print(f"GPU check summary ({mode}; device: {data.get('device')}); {a.json}")
    width = max((len(n) for n in data["steps"]), default=10) + 2
    for name, rec in data["steps"].items():
        secs = f"{rec['seconds']:.0f}s" if rec.get("seconds") is not None else ""
        reason = f" ({rec['reason']})" if rec.get("reason") else ""
        print(f"  {rec.get('plan_step', '?')}. {name:<{width}}{rec['status']:<8}{secs:>6}{reason}")
        for line in figures_line(rec):
            print(f"       {line}")
        parts = rec.get("cuda_only") or {}
        for why in sorted(set(parts.values())):
            print(f"       {why}: {'; '.join(k for k, v in parts.items() if v == why)}")
    counts: dict[str, int] = {}
    for rec in data["steps"].values():
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    print("  " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def init(a: argparse.Namespace) -> None:
    data = {
        "schema": "gpu_check/1",
        "started": now(),
        "updated": now(),
        "finished": None,
        "dry_run": a.dry_run,
        "budget_s": a.budget,
        "cuda": a.cuda,
        "device": None,
        "log": a.log,
        "steps": {
            name: {"name": name, "status": "pending", "reason": "not run yet"} for name in a.steps
        },
    }
    save(a.json, data)


def finish(a: argparse.Namespace) -> None:
    data = load(a.json)
    data["finished"] = now()
    data["wall_s"] = a.wall
    save(a.json, data)


def mmdit_yaml(a: argparse.Namespace) -> None:
    """conf/model/mmdit_sd3.yaml (24 joint blocks, width 1536, ~2B parameters) with the sizes
    bench/train_step.py cannot give it on its own: latents of --size² with SD3's 16 channels, and
    the paper encoders' widths (T5-XXL 4096, CLIP-L 768), so the context is SD3's."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "model" / "mmdit_sd3.yaml")
    cfg.image_size = a.size
    cfg.in_channels = cfg.out_channels = 16
    cfg.t5_dim = 4096
    cfg.clip_txt_dim = cfg.clip_pool_dim = cfg.clip_img_dim = 768
    cfg.t5_tokens = 113
    if a.layers:
        cfg.num_layers = a.layers
    a.dest.parent.mkdir(parents=True, exist_ok=True)
    a.dest.write_text(OmegaConf.to_yaml(cfg))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("init")
    q.add_argument("--json", type=Path, required=True)
    q.add_argument("--steps", nargs="+", required=True)
    q.add_argument("--dry-run", action="store_true")
    q.add_argument("--cuda", action="store_true")
    q.add_argument("--budget", type=int, default=None)
    q.add_argument("--log", default=None)
    q = sub.add_parser("env")
    q.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("record")
    q.add_argument("--json", type=Path, required=True)
    q.add_argument("--step", required=True)
    q.add_argument("--plan", type=int, default=None)
    q.add_argument("--title", default=None)
    q.add_argument(
        "--kind",
        default="other",
        choices=["env", "pytest", "train", "compile", "sr", "sample"] + ["degrade", "other"],
    )
    q.add_argument("--status", default="skipped", help="the status when the step did not run")
    q.add_argument("--reason", default=None)
    q.add_argument("--rc", type=int, default=None, help="exit status; absent: it did not run")
    q.add_argument("--seconds", type=float, default=None)
    q.add_argument("--timeout", type=int, default=None)
    q.add_argument("--cmd", default=None)
    q.add_argument("--figures", default=None, help="the JSON (or JUnit XML) the step wrote")
    q.add_argument("--output", default=None, help="the step's captured output")
    q.add_argument("--cuda-parts", default="", help="';'-separated parts only CUDA measures")
    q = sub.add_parser("status")
    q.add_argument("--json", type=Path, required=True)
    q.add_argument("--step", required=True)
    q = sub.add_parser("summary")
    q.add_argument("--json", type=Path, required=True)
    q = sub.add_parser("finish")
    q.add_argument("--json", type=Path, required=True)
    q.add_argument("--wall", type=float, default=None)
    q = sub.add_parser("mmdit-yaml")
    q.add_argument("dest", type=Path)
    q.add_argument("--size", type=int, default=64, help="latent side (64: 512 px via the VAE)")
    q.add_argument("--layers", type=int, default=None, help="joint blocks (default: SD3's 24)")
    a = p.parse_args(argv)
    if a.action == "env":
        a.out.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(env_figures(), indent=1)
        a.out.write_text(text)
        print(text[:6000])
        return
    if a.action == "status":  # one line: the step's status (and why)
        rec = load(a.json)["steps"][a.step]
        print(rec["status"] + (f" ({rec['reason']})" if rec.get("reason") else ""))
        return
    actions = {"init": init, "record": record, "summary": summary, "finish": finish}
    actions.get(a.action, mmdit_yaml)(a)


if __name__ == "__main__":
    main()
