"""aarch64's int8 path, checked here on x86: the IR our micro-tile emits compiles to usdot / sdot for an aarch64
target, the sign fix of the sdot path is exact, and the path is chosen from the compile target's features.
(Running it bit-exact against the VNNI reference needs an aarch64 CPU or QEMU: `make test-arm`.)"""

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir

from workshop_lib import int8, sysinfo

RNG = np.random.default_rng(28)


def _asm(instruction, lanes, triple, cpu, features):
    module = ir.Module(name="dot")
    module.triple = triple
    vec = ir.VectorType(ir.IntType(32), lanes)
    fn = ir.Function(module, ir.FunctionType(vec, [vec, vec, vec]), name="tile")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(int8._dot_call(builder, instruction, lanes, *fn.args))
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=2)
    return machine.emit_assembly(parsed)


@pytest.mark.parametrize("instruction", ["usdot", "sdot"])
def test_the_tiles_dot_call_compiles_to_the_arm_instruction_for_an_aarch64_target(instruction):
    asm = _asm(instruction, 4, "aarch64-unknown-linux-gnu", "generic", "+neon,+dotprod,+i8mm")
    assert f"{instruction}\tv0.4s, v1.16b, v2.16b" in asm, asm


def test_the_same_call_compiles_to_vpdpbusd_for_x86():
    asm = _asm("vpdpbusd", 16, "x86_64-unknown-linux-gnu", "icelake-server", "+avx512f,+avx512vnni")
    assert "vpdpbusd" in asm and "zmm" in asm, asm


def test_sdots_sign_fix_gives_the_u8_x_s8_product_exactly_modulo_2_32():
    a = RNG.integers(0, 256, (9, 1000), dtype=np.uint8)
    b = RNG.integers(-128, 128, (1000, 37), dtype=np.int8)
    packed = int8.PackedWeights(b, 4)
    shifted = (a ^ np.uint8(0x80)).view(np.int8).astype(np.int64)  # what sdot multiplies: a - 128 as s8
    got = (shifted @ b.astype(np.int64) + int8._sign_fix(packed)[: b.shape[1]]) & 0xFFFFFFFF
    want = (a.astype(np.int64) @ b.astype(np.int64)) & 0xFFFFFFFF
    np.testing.assert_array_equal(got, want)
    assert int8._sign_fix(packed).dtype == np.int32


@pytest.mark.parametrize("features, isa", [({"asimd", "dotprod", "i8mm"}, "i8mm"), ({"asimd", "dotprod"}, "dotprod"),
                                           ({"asimd"}, None)])
def test_the_arm_path_is_chosen_from_the_targets_features(monkeypatch, features, isa):
    monkeypatch.setattr(sysinfo, "target_has", lambda *names: set(names) <= features)
    assert int8.vnni_isa() == isa
    assert int8.fused_isa() is None  # the fused layers are x86 only: the QuantizedCNN takes the GEMM path
    if isa:
        assert int8.pack_weights(np.ones((8, 8), np.int8)).lanes == 4
        with pytest.raises(RuntimeError, match="fused kernels need avx512_vnni or avx_vnni"):
            int8.pack_fused_weights(np.ones((8, 8), np.int8))
