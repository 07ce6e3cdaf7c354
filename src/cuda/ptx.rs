//! The resident kernel's images, embedded at build time, and the choice per GPU.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule, DriverError};
use cudarc::nvrtc::Ptx;

/// Portable PTX (`compute_80`): the driver JIT-compiles it for any sm_80+ GPU.
pub const PTX_COMPUTE_80: &str =
    include_str!(concat!(env!("OUT_DIR"), "/megakernel.compute_80.ptx"));
/// Hopper PTX (`sm_90a`), for compute capability 9.0.
pub const PTX_SM_90A: &str = include_str!(concat!(env!("OUT_DIR"), "/megakernel.sm_90a.ptx"));
/// Hopper machine code: [`PTX_SM_90A`] assembled by `ptxas` at build time
/// (empty when the build had none), so that an H100 loads the kernel without
/// the driver's JIT compilation, which takes minutes for a kernel this size
/// on a machine whose JIT cache is cold.
pub const CUBIN_SM_90A: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/megakernel.sm_90a.cubin"));

/// The kernel images for one GPU: machine code where the build has it for
/// that GPU, and the PTX that is loaded when it has none or the driver
/// refuses it.
#[derive(Clone, Copy, Debug)]
pub struct Image {
    /// `sm_90a` or `compute_80`.
    pub arch: &'static str,
    /// The PTX.
    pub ptx: &'static str,
    /// Machine code for exactly this GPU, if any.
    pub cubin: Option<&'static [u8]>,
}

/// The images to load on a GPU of compute capability `major.minor` (sm_80 or newer).
pub fn select(major: i32, minor: i32) -> Image {
    if (major, minor) == (9, 0) {
        Image {
            arch: "sm_90a",
            ptx: PTX_SM_90A,
            cubin: (!CUBIN_SM_90A.is_empty()).then_some(CUBIN_SM_90A),
        }
    } else {
        Image {
            arch: "compute_80",
            ptx: PTX_COMPUTE_80,
            cubin: None,
        }
    }
}

/// Loads `image` into `ctx`: its machine code if the driver takes it (a
/// driver older than the assembler's rejects it), else its PTX. Also says
/// which of the two was loaded (`"cubin"` or `"PTX"`).
pub fn load(
    ctx: &Arc<CudaContext>,
    image: Image,
) -> Result<(Arc<CudaModule>, &'static str), DriverError> {
    if let Some(cubin) = image.cubin {
        if let Ok(module) = ctx.load_module(Ptx::from_binary(cubin.to_vec())) {
            return Ok((module, "cubin"));
        }
    }
    Ok((ctx.load_module(Ptx::from_src(image.ptx))?, "PTX"))
}
