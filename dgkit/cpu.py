"""The CPU's int8 instruction sets, and which INT8 flavour (`--cpu`) computes right on it.

onnxruntime's u8 x s8 kernels on x86 with AVX2 alone add the products of input channels 2i and
2i+1 in 16 bits (vpmaddubsw) and saturate; with AVX512-VNNI, AVX-VNNI or AMX-INT8, and on ARM64
with the dot-product instructions, they accumulate in 32 bits. So a model with 8-bit weights
everywhere (the `vnni` flavour) is exact on the second kind and wrong on the first, and the
`avx2` flavour (7-bit and pair-budget weights) is exact on both but slower on the second.

Torch-free: the Predictor and `dgkit validate` read it on the edge box.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
# Instruction sets whose int8 dot products accumulate in 32 bits (x86 flags, ARM64 "asimddp").
DOT_32BIT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
CPU_FLAVOURS = ("avx2", "vnni")  # `dgkit export --cpu`; Format.cpu in dgkit.export.formats
FAKE_ENV = "DGKIT_CPU_FEATURES"  # comma-separated flags used instead of /proc/cpuinfo's


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return name, frozenset(flags)


def cpu_model() -> str:
    """The CPU's model name, or "" where /proc/cpuinfo does not say."""
    return _cpuinfo()[0]


def features() -> frozenset[str]:
    """This CPU's int8 instruction sets (of INT8_FLAGS); $DGKIT_CPU_FEATURES replaces them,
    which is how the tests and a what-if check pretend to be another CPU."""
    fake = os.environ.get(FAKE_ENV)
    flags = _cpuinfo()[1] if fake is None else frozenset(fake.replace(",", " ").split())
    return frozenset(f for f in INT8_FLAGS if f in flags)


def instruction_sets() -> str:
    """This CPU's int8 instruction sets as a report names them, e.g. "avx2/avx512_vnni"."""
    found = features()
    return "/".join(f for f in INT8_FLAGS if f in found) or "no int8 extensions listed"


def native_flavour() -> str:
    """The INT8 flavour that is exact and fastest on this CPU (`--cpu auto`)."""
    return "vnni" if features() & set(DOT_32BIT) else "avx2"


def mismatch(precision: str) -> str | None:
    """Why an ONNX model of this precision computes wrong answers on this CPU, or None."""
    from dgkit.export.formats import cpu_flavour_of

    if cpu_flavour_of(precision) == "vnni" and native_flavour() != "vnni":
        return (f"it was exported for CPUs whose int8 products add up in 32 bits "
                f"({', '.join(DOT_32BIT)}) and this CPU has {instruction_sets()}, on which "
                f"onnxruntime's int8 kernels saturate, so its results would be wrong here")
    return None
