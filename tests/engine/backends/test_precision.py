"""``dtype`` → the module's storage dtype and the encoder's precision; what a CPU runs natively (#29)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from radflash.devices import native_precisions, resolve_dtype, resolve_precision
from radflash.errors import InputError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("dtype", "cpu", "cuda"), [
    (None, "fp32", "bf16"), ("auto", "auto", "bf16"), ("float32", "fp32", "fp32"), ("bfloat16", "bf16", "bf16"),
    ("float16", "fp16", "fp16"), ("int8", "int8", "int8"), ("BF16", "bf16", "bf16"), (torch.float16, "fp16", "fp16"),
])
def test_precision_from_dtype(dtype, cpu: str, cuda: str) -> None:
    assert resolve_precision(dtype, CPU) == cpu and resolve_precision(dtype, CUDA) == cuda


@pytest.mark.parametrize("dtype", [None, "auto", "float32", "bfloat16", "float16", "int8"])
def test_the_cpu_module_stays_float32_for_every_name(dtype) -> None:
    """Lower precision is the encoder backend's business on the CPU: text, heads, norms and maps stay float32."""
    assert resolve_dtype(dtype, CPU) == torch.float32
    assert resolve_dtype(torch.bfloat16, CPU) == torch.bfloat16  # a torch.dtype means the whole module
    assert resolve_dtype(dtype, CUDA) == {"float32": torch.float32, "float16": torch.float16}.get(dtype, torch.bfloat16)


def test_unknown_dtype_is_one_line() -> None:
    with pytest.raises(InputError, match="unknown dtype 'int4'"):
        resolve_precision("int4", CPU)


@pytest.mark.parametrize(("flags", "native"), [
    ({"avx2", "fma"}, ("fp32", "int8")),  # AVX2-only EPYC: bf16 would be emulated
    ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, ("fp32", "int8", "bf16")),  # Zen 4
    ({"avx512f", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}, ("fp32", "int8", "bf16", "fp16")),  # SPR
])
def test_native_precisions_from_flags(flags: set[str], native: tuple[str, ...]) -> None:
    assert native_precisions(flags) == native


def test_score_rejects_an_unknown_dtype_flag(tmp_path) -> None:
    from radflash.cli import cli

    res = CliRunner().invoke(cli, ["score", str(tmp_path), "--dtype", "int4"])
    assert res.exit_code == 2 and "int4" in res.output
