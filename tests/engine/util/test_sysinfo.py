"""CPU kinds: results are filed per kind, so two generations that share a model name must not share a file."""

from __future__ import annotations

from radflash.util.sysinfo import cpu_kind

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu avx2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
"""


def test_kind_has_family_and_model_of_the_first_processor() -> None:
    assert cpu_kind(ZEN3) == "AMD EPYC (family 25 model 1)"
    assert cpu_kind(ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n", 1)) == "AMD EPYC (family 25 model 17)"


def test_kind_without_family_numbers_is_the_model_name() -> None:
    arm = "processor\t: 0\nmodel name\t: Neoverse-V2\nFeatures\t: fp asimd\n"
    assert cpu_kind(arm) == "Neoverse-V2"
