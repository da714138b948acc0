"""The macOS branches of sysinfo and placement, run here by injecting what macOS answers.

macOS has no /proc and no sched_getaffinity; its answers come from sysctl. Each test replaces the
platform's answers (sys.platform, platform.machine, sysctl's output, os.cpu_count) with a Mac's,
so these branches cannot rot unseen on the Linux machines that run the suite.
"""

import os
import sys

import pytest

from workshop_lib import placement, sysinfo

# what `sysctl -n NAME` prints on an Intel Mac (an i9-9980HK) and on an Apple M2 / M4
INTEL_MAC = {
    "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz",
    "machdep.cpu.features": "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH DS ACPI "
                            "MMX FXSR SSE SSE2 SS HTT TM PBE SSE3 PCLMULQDQ DTES64 MON DSCPL VMX EST TM2 SSSE3 FMA "
                            "CX16 TPR PDCM SSE4.1 SSE4.2 x2APIC MOVBE POPCNT AES PCID XSAVE OSXSAVE SEGLIM64 "
                            "TSCTMR AVX1.0 RDRAND F16C",
    "machdep.cpu.leaf7_features": "RDWRFSGS TSC_THREAD_OFFSET SGX BMI1 HLE AVX2 SMEP BMI2 ERMS INVPCID RTM FPU_CSDS "
                                  "MPX RDSEED ADX SMAP CLFSOPT IPT SGXLC MDCLEAR TSXFA IBRS STIBP L1DF SSBD",
    "hw.physicalcpu": "8",
}
M2 = {"machdep.cpu.brand_string": "Apple M2", "hw.physicalcpu": "8", "hw.optional.AdvSIMD": "1",
      "hw.optional.arm.FEAT_DotProd": "1", "hw.optional.arm.FEAT_I8MM": "1", "hw.optional.arm.FEAT_BF16": "1",
      "hw.optional.arm.FEAT_SVE": "", "hw.optional.arm.FEAT_SME": "0"}
M4 = dict(M2, **{"machdep.cpu.brand_string": "Apple M4 Pro", "hw.physicalcpu": "14",
                 "hw.optional.arm.FEAT_SME": "1"})


@pytest.fixture
def mac(monkeypatch):
    """Turn this process into a Mac for sysinfo: ``mac(answers, machine)``."""

    def become(answers, machine):
        monkeypatch.setattr(sys, "platform", "darwin")
        monkeypatch.setattr(sysinfo.platform, "machine", lambda: machine)
        monkeypatch.setattr(sysinfo.platform, "processor", lambda: "i386" if machine == "x86_64" else "arm")
        monkeypatch.setattr(sysinfo, "_proc_cpuinfo", lambda: "")  # no /proc on macOS
        monkeypatch.setattr(sysinfo, "_sysctl", lambda name: answers.get(name, ""))
        monkeypatch.setattr(sysinfo, "_hwcaps", lambda: None)
        monkeypatch.setattr(os, "cpu_count", lambda: int(answers["hw.physicalcpu"]) * (2 if machine == "x86_64" else 1))
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        sysinfo._os_view.cache_clear()

    yield become
    sysinfo._os_view.cache_clear()


def test_an_intel_mac_reads_features_model_and_cores_from_sysctl(mac):
    mac(INTEL_MAC, "x86_64")
    features = sysinfo.cpu_features()
    assert set(features) == set(sysinfo.FEATURES)
    assert {f for f, on in features.items() if on} == {"sse4_2", "avx2", "fma"}
    assert sysinfo.cpu_model() == "Intel(R) Core(TM) i9-9980HK CPU @ 2.40GHz"
    assert sysinfo.core_counts() == {"logical": 16, "physical": 8, "usable": 16}


@pytest.mark.parametrize("answers, expected", [(M2, {"asimd", "dotprod", "i8mm", "bf16"}),
                                               (M4, {"asimd", "dotprod", "i8mm", "bf16", "sme"})])
def test_an_apple_silicon_mac_reads_its_arm_features_from_hw_optional(mac, answers, expected):
    mac(answers, "arm64")
    assert sysinfo._machine() == "aarch64"
    features = sysinfo.cpu_features()
    assert set(features) == set(sysinfo.ARM_FEATURES)
    assert {f for f, on in features.items() if on} == expected
    assert sysinfo.cpu_model() == answers["machdep.cpu.brand_string"]
    assert sysinfo.core_counts()["physical"] == int(answers["hw.physicalcpu"])


def test_a_mac_whose_sysctl_says_nothing_has_no_os_view(mac):
    mac({"hw.physicalcpu": "4"}, "arm64")
    assert sysinfo.os_features() is None  # then the compile target alone decides (compile_target's "os" is None)


def test_placement_on_a_mac_uses_every_cpu_and_never_binds(mac):
    mac(M2, "arm64")
    assert placement.usable_cpus() == tuple(range(8))
    one = placement.plan(placement.usable_cpus(), local_size=1, local_rank=0, env={})
    assert one.cores == tuple(range(8)) and one.binding == "inherited" and one.numba_threads == 8
    two = [placement.plan(placement.usable_cpus(), local_size=2, local_rank=r, env={}) for r in range(2)]
    assert [p.numba_threads for p in two] == [4, 4]
    assert not set(two[0].cores) & set(two[1].cores)


def test_linux_arm_reads_the_auxiliary_vector_even_where_proc_cpuinfo_shows_x86(monkeypatch):
    """Under QEMU's user mode /proc/cpuinfo is the host's (x86 flags); the hwcaps are the emulated CPU's."""
    monkeypatch.setattr(sysinfo.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(sysinfo, "_proc_cpuinfo", lambda: "flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    hwcap = 1 << 1 | 1 << 20  # asimd, asimddp
    hwcap2 = 1 << 13 | 1 << 14  # i8mm, bf16
    monkeypatch.setattr(sysinfo, "_hwcaps", lambda: (hwcap, hwcap2))
    assert {f for f, on in sysinfo.os_features().items() if on} == {"asimd", "dotprod", "i8mm", "bf16"}
