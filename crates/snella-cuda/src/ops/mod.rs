//! Safe launchers of the kernels in `kernels/`, one module per `.cu` file (op family).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod gelu;
pub mod importance;
pub mod layernorm;
pub mod merge;
pub mod patch;
pub mod reduce;
pub mod sparsify;
pub mod topk;

/// A read-only device input: a view of an f32 buffer (`buf.slice(..)`).
pub type In<'a> = cudarc::driver::CudaView<'a, f32>;
/// A device output: a mutable view of an f32 buffer (`buf.slice_mut(..)`).
pub type Out<'a> = cudarc::driver::CudaViewMut<'a, f32>;

/// Threads per block for simple element-wise kernels.
pub const BLOCK: u32 = 256;

/// A 1-D launch over `n` elements.
pub fn grid(n: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}
