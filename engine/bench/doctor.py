"""``radflash doctor``: what this install can do on this machine, in one report.

Why: "refused for a missing decoder", "auto picked eager", "the DICOMweb tests skipped" each have a
cause spread over pip, the CPU, the GPU stack and the Debian packages. One command that gathers them
(decoders per transfer syntax with the extra that adds a missing one, CPU model and flags, dtypes and
backends with the cached ``auto`` decisions, GPU/CUDA/Triton, installed extras, cache folders and
their sizes, the services tests and ``serve`` start) answers the first question of any bug report.

It lives with the bench harness because it reports on the same things (machine info, backends) and
may import every stage below it. Nothing here raises for a missing piece: a missing piece is what
the report is for. Versions come from package metadata, so optional libraries are not imported.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from radflash.util.sysinfo import cpu_kind, nvidia_driver, package_version, usable_cores

RELEVANT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                  "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# Debian packages the tests and services use: (name, executable, what needs it)
SERVICES = (
    ("Orthanc", "Orthanc", "DICOMweb tests and PACS inputs: apt-get install orthanc orthanc-dicomweb"),
    ("DCMTK", "dcmj2pnm", "DCMTK conformance and decoder tests: apt-get install dcmtk"),
    ("dciodvfy", "dciodvfy", "DICOM SR/SEG validation tests: apt-get install dicom3tools"),
    ("Chromium", "chromium", "report.html browser tests: apt-get install chromium chromium-driver"),
    ("chromedriver", "chromedriver", "report.html browser tests: apt-get install chromium-driver"),
)
ORTHANC_DICOMWEB = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")


def collect() -> dict[str, Any]:
    """The whole report as a JSON-ready dict (sections in the order the text prints them)."""
    from radflash import __version__

    return {
        "radflash": __version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "decoders": decoders(),
        "cpu": cpu(),
        "torch": torch_state(),
        "backends": backends(),
        "auto_decisions": auto_decisions(),
        "extras": extras(),
        "caches": caches(),
        "services": services(),
    }


def decoders() -> list[dict[str, Any]]:
    from radflash.io.decoders import syntax_table

    return syntax_table()


def cpu() -> dict[str, Any]:
    from radflash.devices import cpu_flags, fast_int8, native_precisions

    flags = cpu_flags()
    return {"model": cpu_kind(), "cores_usable": usable_cores(), "cores_logical": os.cpu_count(),
            "flags": [f for f in RELEVANT_FLAGS if f in flags], "native_precisions": list(native_precisions()),
            "fast_int8": fast_int8()}


def torch_state() -> dict[str, Any]:
    """torch, CUDA and Triton as this process sees them (CUDA is only queried, never initialised twice)."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    triton = package_version("triton")
    if triton is None:
        triton_mode = "not installed (pip install 'radflash[triton]')"
    elif cuda:
        triton_mode = "compiled kernels on CUDA"
    else:
        triton_mode = "installed; no CUDA, so the kernels run through torch (the tests use Triton's interpreter)"
    return {"version": torch.__version__, "threads": torch.get_num_threads(), "cuda_available": cuda,
            "cuda_runtime": torch.version.cuda, "driver": nvidia_driver(), "gpus": gpus, "triton": triton,
            "triton_mode": triton_mode}


def backends() -> list[dict[str, Any]]:
    """Encoder backends: whether each can run here, and the install line when not."""
    rows = [{"name": "eager", "available": True, "why": "plain PyTorch"}]
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    rows.append({"name": "compile", "available": compiler is not None,
                 "why": f"torch.compile with {compiler}" if compiler else "no C compiler for torch.compile's CPU code"})
    for name, dist, extra in (("onnxruntime", "onnxruntime", "onnx"), ("openvino", "openvino", "openvino"),
                              ("tensorrt", "tensorrt", "tensorrt")):
        version = package_version(dist) or (package_version("onnxruntime-gpu") if name == "onnxruntime" else None)
        rows.append({"name": name, "available": version is not None,
                     "why": f"{dist} {version}" if version else f"pip install 'radflash[{extra}]'"})
    return rows


def auto_decisions() -> dict[str, Any]:
    """The last ``--backend auto`` decision cached per model (and batch/image size), newest file state."""
    from radflash.backends.auto import _read_cache, cache_path

    path = cache_path()
    entries = _read_cache(path) if path.exists() else {}
    rows = []
    for record in entries.values():
        key = record.get("key") or {}
        rows.append({"model": str(key.get("model", "?"))[:16], "device": key.get("device"),
                     "batch_size": key.get("batch_size"), "image_size": key.get("image_size"),
                     "chosen": record.get("chosen"), "precision": record.get("precision"),
                     "reason": record.get("reason")})
    return {"cache_file": str(path), "decisions": rows}


def extras() -> dict[str, dict[str, Any]]:
    """Per extra of radflash's own metadata: its packages and whether each is installed."""
    try:
        requires = metadata.requires("radflash") or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for req in requires:
        marker = re.search(r'extra\s*==\s*"([^"]+)"', req)
        if not marker:
            continue
        name = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0]
        entry = out.setdefault(marker.group(1), {"packages": {}, "installed": True})
        version = package_version(name)
        entry["packages"][name] = version
        entry["installed"] = entry["installed"] and version is not None
    return out


def caches() -> list[dict[str, Any]]:
    """Folders radflash and its compilers write to, with their size (absent ones: size None)."""
    import getpass

    from radflash.backends.export import cache_dir

    try:
        user = getpass.getuser()  # torch's own default: /tmp/torchinductor_<user>
    except (KeyError, OSError):
        user = "user"
    folders = [("radflash (exports, auto decisions)", cache_dir()),
               ("torch inductor", Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or f"/tmp/torchinductor_{user}")),
               ("triton", Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"))]
    return [{"name": name, "path": str(path), "bytes": _size(path)} for name, path in folders]


def services() -> list[dict[str, Any]]:
    rows = []
    for name, exe, purpose in SERVICES:
        path = shutil.which(exe) or (exe == "Orthanc" and next((p for p in ("/usr/sbin/Orthanc",)
                                                                if os.path.exists(p)), None)) or None
        row = {"name": name, "found": path is not None, "path": path, "version": None, "purpose": purpose}
        if path and name == "DCMTK":
            row["version"] = _first_line([path, "--version"])
        if name == "Orthanc" and path:
            row["dicomweb_plugin"] = any(Path(p).exists() or any(Path(p).parent.glob(Path(p).name + "*"))
                                         for p in ORTHANC_DICOMWEB)
        rows.append(row)
    return rows


def render_text(report: dict[str, Any]) -> str:
    """The report as plain text, one fact a line (what a bug report should paste)."""
    lines = [f"radflash {report['radflash']} · Python {report['python']} · {report['os']}", "", "Transfer syntaxes"]
    for r in report["decoders"]:
        state = f"yes ({r['decoder']})" if r["decodes"] else f"NO: {r['missing']}"
        lines.append(f"  {r['name']:<52} {r['uid']:<24} {state}")
    c = report["cpu"]
    lines += ["", f"CPU: {c['model']} · {c['cores_usable']} usable of {c['cores_logical']} cores",
              f"  flags: {' '.join(c['flags']) or '-'}",
              f"  native precisions: {', '.join(c['native_precisions'])}; "
              f"fast int8: {'yes' if c['fast_int8'] else 'no'}"]
    t = report["torch"]
    gpus = ", ".join(f"{g['index']}: {g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in t["gpus"])
    lines += ["", f"torch {t['version']} · {t['threads']} threads · CUDA "
              + (f"available (runtime {t['cuda_runtime']}, driver {t['driver']}): {gpus}" if t["cuda_available"]
                 else f"not available (torch built for CUDA {t['cuda_runtime'] or '-'}; driver {t['driver'] or '-'})"),
              f"  Triton: {t['triton'] or '-'}: {t['triton_mode']}", "", "Backends"]
    for b in report["backends"]:
        lines.append(f"  {b['name']:<12} {'yes' if b['available'] else 'no '}  {b['why']}")
    auto = report["auto_decisions"]
    lines.append(f"  auto decisions cached in {auto['cache_file']}: {len(auto['decisions']) or 'none'}")
    for d in auto["decisions"]:
        lines.append(f"    model {d['model']} on {d['device']}, batch {d['batch_size']}, {d['image_size']} px → "
                     f"{d['chosen']}/{d['precision']}" + (f" ({d['reason']})" if d.get("reason") else ""))
    lines += ["", "Extras"]
    for name, e in sorted(report["extras"].items()):
        missing = [p for p, v in e["packages"].items() if v is None]
        lines.append(f"  {name:<10} {'installed' if e['installed'] else 'missing ' + ', '.join(missing)}")
    lines += ["", "Caches"]
    for cache in report["caches"]:
        size = "absent" if cache["bytes"] is None else _human(cache["bytes"])
        lines.append(f"  {cache['name']:<36} {cache['path']} ({size})")
    lines += ["", "Services (tests, serve)"]
    for s in report["services"]:
        extra = ""
        if s["name"] == "Orthanc" and s["found"]:
            extra = "; DICOMweb plugin " + ("found" if s.get("dicomweb_plugin") else "MISSING")
        found = f"found {s['path']}" + (f" ({s['version']})" if s["version"] else "") if s["found"] else "not found"
        lines.append(f"  {s['name']:<12} {found}{extra}" + ("" if s["found"] else f": {s['purpose']}"))
    return "\n".join(lines)


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)


def _size(path: Path) -> int | None:
    if not path.exists():
        return None
    total = 0
    for root, _, files in os.walk(path, onerror=lambda exc: None):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:  # a file removed while we walk: it no longer counts
                continue
    return total


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip("$ ").strip() if text else None
