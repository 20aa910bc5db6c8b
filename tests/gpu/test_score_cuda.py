"""``radflash score`` on CUDA over the embedded demo archive, against CPU runs of the same model.

Every file must get the same status and reason as on CPU, the same files must be scored, and each
logit must be within ``numerics.bound`` of the CPU's own error in the same dtype against a float64
CPU run (K = the model width). The bf16 run is the production one: default dtype and decode
workers (spawned next to a CUDA parent), results written to disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import radflash
from radflash.archive.verb import DEMO_ARCHIVE, ScoreRun, score
from tests.gpu.numerics import EPS, bound, fp32_math, max_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def by_path(run: ScoreRun) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """(path → status row without the path, path → logits in a fixed finding order)."""
    status = {r.pop("path"): tuple(r.values()) for r in run.status.to_pylist()}
    cols = sorted(c for c in run.results.column_names if c.endswith(".logit"))
    table = run.results.to_pydict()
    logits = {p: np.array([table[c][i] for c in cols], dtype=np.float64) for i, p in enumerate(table["path"])}
    return status, logits


def test_score_demo_archive_on_cuda(cuda: torch.device, tmp_path: Path) -> None:
    if not DEMO_ARCHIVE.is_dir():
        pytest.skip("embedded demo archive not built (python -m radflash.training.demo_assets)")
    try:
        f64 = radflash.load(device="cpu", dtype=torch.float64)
    except (radflash.RadflashError, OSError) as exc:
        pytest.skip(f"embedded demo model does not load: {exc}")
    ref_status, ref = by_path(score(model=f64, workers=0, progress=False))
    paths = sorted(ref)
    exp = torch.tensor(np.stack([ref[p] for p in paths]))
    width = f64.config.vision.hidden

    for dtype, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        cpu_status, cpu = by_path(score(device="cpu", dtype=dtype, workers=0, progress=False))
        with fp32_math(tf32=False):
            if dt == torch.bfloat16:  # as `radflash score --device cuda -o OUT` runs it
                run = score(output=tmp_path / "out", device=str(cuda), progress=False)
            else:
                run = score(device=str(cuda), dtype=dtype, workers=0, progress=False)
        assert run.manifest["device"] == str(cuda) and run.manifest["dtype"] == dtype
        status, got = by_path(run)
        assert status == ref_status == cpu_status, f"{dtype}: status rows differ from the CPU run"
        assert sorted(got) == paths == sorted(cpu), f"{dtype}: a different set of files was scored"
        err = max_err(torch.tensor(np.stack([got[p] for p in paths])), exp)
        err_cpu = max_err(torch.tensor(np.stack([cpu[p] for p in paths])), exp)
        tol = bound(err_cpu, exp, EPS[dt], width)
        assert err <= tol, f"{dtype}: GPU logit error {err:.3g} > {tol:.3g} (CPU error {err_cpu:.3g})"
    assert run.results_path is not None and run.results_path.is_file()
