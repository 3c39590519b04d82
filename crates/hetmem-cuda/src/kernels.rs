//! The kernels the tests and the probe run, as CUDA C and as PTX generated from it.
//!
//! `kernels/kernels.ptx` is NVRTC 13.0's output for `compute_75` (PTX ISA 9.0, which a CUDA 13.0
//! driver accepts); `scripts/gen-ptx.sh` regenerates it, and a test checks the two agree where
//! NVRTC 13.0 is installed.

/// CUDA C source of the kernels.
pub const SOURCE: &str = include_str!("kernels/kernels.cu");

/// PTX of [`SOURCE`] for `compute_75`.
pub const PTX: &str = include_str!("kernels/kernels.ptx");

/// The virtual architecture [`PTX`] was generated for.
pub const PTX_ARCH: (u32, u32) = (7, 5);

/// Kernel names, all `extern "C"`.
pub mod names {
    /// `()`: does nothing.
    pub const EMPTY: &str = "hetmem_empty";
    /// `(u8* p, u64 n, u8 v)`: `p[i] += v`.
    pub const ADD_U8: &str = "hetmem_add_u8";
    /// `(u32* p, u64 n, u32 v)`: `p[i] = v + i`.
    pub const FILL_U32: &str = "hetmem_fill_u32";
    /// `(const u64* p, u64 n, u64* out)`: `*out += sum(p)`.
    pub const SUM_U64: &str = "hetmem_sum_u64";
    /// `(u64* p, u64 n, u64 v)`: `p[i] = v`.
    pub const WRITE_U64: &str = "hetmem_write_u64";
    /// `(Node* head, u64* count)`: walks a list of `{next, value, out}` nodes.
    pub const WALK_LIST: &str = "hetmem_walk_list";
    /// `(u32* rows, u64 nrows, u64 first_row, u32 iter)`: the demo's row stencil, in place,
    /// one 1024-word row per thread block.
    pub const ROW_STENCIL: &str = "hetmem_row_stencil";
    /// `(const u64* p, u64 words, u64 touches, u64 seed, u64* out)`: `touches` 8-byte reads at
    /// random 4 KiB pages of `p` (a per-thread xorshift64, see the source), `*out += sum`.
    pub const TOUCH_RANDOM: &str = "hetmem_touch_random";
    /// All of them.
    pub const ALL: &[&str] = &[
        EMPTY,
        ADD_U8,
        FILL_U32,
        SUM_U64,
        WRITE_U64,
        WALK_LIST,
        ROW_STENCIL,
        TOUCH_RANDOM,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_declares_every_kernel_and_a_driver_13_0_isa() {
        for n in names::ALL {
            assert!(
                PTX.contains(&format!(".entry {n}(")),
                "{n} missing from the PTX"
            );
            assert!(
                SOURCE.contains(&format!("void {n}(")),
                "{n} missing from the source"
            );
        }
        // A CUDA 13.0 driver accepts PTX ISA up to 9.0.
        assert!(PTX.contains(".version 9.0"), "PTX ISA is not 9.0");
        assert!(PTX.contains(".target sm_75"));
    }
}
