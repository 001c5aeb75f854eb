//! Just enough of an eBPF assembler for [`crate::program`]: the instructions it uses, each one
//! 64-bit word as the kernel reads it, and jumps to named labels resolved at the end.

use std::collections::HashMap;

/// Registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 kept across calls,
/// r10 the read-only frame pointer.
pub(crate) type Reg = u8;
pub(crate) const R0: Reg = 0;
pub(crate) const R1: Reg = 1;
pub(crate) const R2: Reg = 2;
pub(crate) const R3: Reg = 3;
pub(crate) const R6: Reg = 6;
pub(crate) const R7: Reg = 7;
pub(crate) const R8: Reg = 8;
pub(crate) const FP: Reg = 10;

// Opcodes (class | size/op | source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JA: u8 = 0x05; // BPF_JMP | BPF_JA
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
const LD_DW_IMM: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
/// The `bpf_map_lookup_elem` helper (enum bpf_func_id).
const MAP_LOOKUP_ELEM: i32 = 1;
/// `BPF_PSEUDO_MAP_FD`: the 64-bit immediate is a map fd, which the kernel swaps for the map.
const PSEUDO_MAP_FD: u8 = 1;

fn encode(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf) << 8)
        | (u64::from(src & 0xf) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// A program being written: instructions in order, labels, and jumps still to resolve.
#[derive(Default)]
pub(crate) struct Asm {
    insns: Vec<u64>,
    labels: HashMap<&'static str, usize>,
    /// (index of a jump, label it goes to)
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
        self.insns.push(encode(code, dst, src, off, imm));
        self
    }

    /// `dst = *(u32 *)(src + off)`
    pub(crate) fn load32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(LDX_W, dst, src, off, 0)
    }

    /// `*(u32 *)(dst + off) = src`
    pub(crate) fn store32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(STX_W, dst, src, off, 0)
    }

    /// `*(u32 *)(dst + off) = imm`
    pub(crate) fn store32_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(ST_W, dst, 0, off, imm)
    }

    /// `dst = src`
    pub(crate) fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(MOV64_X, dst, src, 0, 0)
    }

    /// `dst = imm`
    pub(crate) fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(MOV64_K, dst, 0, 0, imm)
    }

    /// `dst += imm`
    pub(crate) fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(ADD64_K, dst, 0, 0, imm)
    }

    /// `dst = map` (the map's fd, a two-slot instruction)
    pub(crate) fn load_map(&mut self, dst: Reg, map_fd: i32) -> &mut Self {
        self.push(LD_DW_IMM, dst, PSEUDO_MAP_FD, 0, map_fd);
        self.push(0, 0, 0, 0, 0)
    }

    fn jump(&mut self, code: u8, reg: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.push(code, reg, 0, 0, imm)
    }

    /// `if reg == imm goto label`
    pub(crate) fn jeq(&mut self, reg: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jump(JEQ_K, reg, imm, label)
    }

    /// `if reg != imm goto label`
    pub(crate) fn jne(&mut self, reg: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.jump(JNE_K, reg, imm, label)
    }

    /// `goto label`
    pub(crate) fn ja(&mut self, label: &'static str) -> &mut Self {
        self.jump(JA, 0, 0, label)
    }

    /// `r0 = helper(r1, ..., r5)`
    pub(crate) fn call(&mut self, helper: i32) -> &mut Self {
        self.push(CALL, 0, 0, 0, helper)
    }

    /// `return r0`
    pub(crate) fn exit(&mut self) -> &mut Self {
        self.push(EXIT, 0, 0, 0, 0)
    }

    /// `r0 = bpf_map_lookup_elem(map, fp + key)`: the map in r1, the key's stack address in
    /// r2, then the call (r0: the value, or 0 when the key is absent).
    pub(crate) fn lookup(&mut self, map_fd: i32, key: i16) -> &mut Self {
        self.load_map(R1, map_fd)
            .mov(R2, FP)
            .add_imm(R2, i32::from(key))
            .call(MAP_LOOKUP_ELEM)
    }

    /// Names the next instruction.
    pub(crate) fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.insns.len());
        self
    }

    /// The instructions, every jump pointing at its label (offsets count from the next
    /// instruction). A jump to a label never defined is a bug in the program text: panics in
    /// the unit test that assembles it.
    pub(crate) fn finish(mut self) -> Vec<u64> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = self.labels[label];
            let off = target as i64 - at as i64 - 1;
            let off = (off as i16 as u16 as u64) << 16;
            self.insns[at] = (self.insns[at] & !(0xffff << 16)) | off;
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_kernel_reads() {
        // r2 = *(u32 *)(r6 + 64): 61 62 40 00 00 00 00 00
        assert_eq!(
            encode(LDX_W, R2, R6, 64, 0).to_le_bytes(),
            [0x61, 0x62, 0x40, 0, 0, 0, 0, 0]
        );
        // r0 = 1
        assert_eq!(
            encode(MOV64_K, R0, 0, 0, 1).to_le_bytes(),
            [0xb7, 0, 0, 0, 1, 0, 0, 0]
        );
        // r2 += -4
        assert_eq!(
            encode(ADD64_K, R2, 0, 0, -4).to_le_bytes(),
            [0x07, 0x02, 0, 0, 0xfc, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn jumps_count_from_the_next_instruction() {
        let mut a = Asm::default();
        a.jeq(R0, 0, "out").mov_imm(R0, 1).label("out").exit();
        let insns = a.finish();
        assert_eq!((insns[0] >> 16) as u16, 1);
        let mut b = Asm::default();
        b.label("top").mov_imm(R0, 0).ja("top");
        assert_eq!((b.finish()[1] >> 16) as u16 as i16, -2);
    }
}
