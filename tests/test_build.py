"""The build picks CMake options from the CPU's own flags; packaging puts all folders under `edgellm`."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from edgellm.buildflags import cache_key, cmake_args, cpu_flags
from edgellm.commands.doctor import build_mismatches

ROOT = Path(__file__).resolve().parent.parent
SAPPHIRE_RAPIDS = ("flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2 avx512f avx512bw avx512vbmi avx512_vnni "
                   "avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8\n")
EPYC = "flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16\n"
OLD_LAPTOP = "flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2\n"


def options(cpuinfo: str) -> dict[str, str]:
    return dict(a[2:].split("=") for a in cmake_args(cpu_flags(cpuinfo), cuda=False))


def test_sapphire_rapids_never_gets_amx_or_native():
    opts = options(SAPPHIRE_RAPIDS)
    assert opts["GGML_NATIVE"] == "OFF"
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF"
    assert opts["GGML_AVX512"] == opts["GGML_AVX_VNNI"] == opts["GGML_AVX512_BF16"] == "ON"


def test_epyc_gets_no_avx_vnni():
    opts = options(EPYC)
    assert opts["GGML_AVX_VNNI"] == "OFF"
    assert opts["GGML_AVX512_VNNI"] == opts["GGML_AVX512_VBMI"] == "ON"


def test_avx2_only_machine():
    opts = options(OLD_LAPTOP)
    assert opts["GGML_AVX2"] == opts["GGML_FMA"] == "ON"
    assert opts["GGML_AVX512"] == "OFF"


def test_cache_key_follows_the_flags():
    keys = {cache_key(cmake_args(cpu_flags(c), cuda=False)) for c in (SAPPHIRE_RAPIDS, EPYC, OLD_LAPTOP)}
    assert len(keys) == 3
    assert cache_key(cmake_args(cpu_flags(EPYC), False)) != cache_key(cmake_args(cpu_flags(EPYC), True))


def test_doctor_flags_instructions_the_cpu_lacks():
    info = "CPU : AVX = 1 | AVX2 = 1 | AVX_VNNI = 1 | AVX512 = 1 | AMX_INT8 = 1 |"
    problems = build_mismatches(cpu_flags(EPYC), info)
    assert any(p.startswith("AVX_VNNI") for p in problems)
    assert any(p.startswith("AMX_INT8") for p in problems)
    assert build_mismatches(cpu_flags(EPYC), "CPU : AVX = 1 | AVX2 = 1 | AVX512 = 1 |") == []


def test_installed_build_matches_this_cpu():
    from edgellm.runtime import backend

    assert build_mismatches(cpu_flags(), backend.system_info()) == []


def test_subpackages_live_under_the_edgellm_namespace():
    for name, folder in (("edgellm.quantize", "quantize"), ("edgellm.tui", "tui")):
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).parent == ROOT / folder
    # the generic top-level names are not installed (they would clash with other PyPI packages)
    code = "import importlib.util as u; print(u.find_spec('quantize'), u.find_spec('tui'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "None None"


def test_build_script_prints_its_choice():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_llama.py"), "--print"],
                         capture_output=True, text=True, check=True)
    assert "-DGGML_NATIVE=OFF" in out.stdout and "-DGGML_AMX_INT8=OFF" in out.stdout
