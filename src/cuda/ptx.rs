//! The resident kernel's PTX, embedded at build time, and the choice per GPU.

/// Portable PTX (`compute_80`): the driver JIT-compiles it for any sm_80+ GPU.
pub const PTX_COMPUTE_80: &str =
    include_str!(concat!(env!("OUT_DIR"), "/megakernel.compute_80.ptx"));
/// Hopper PTX (`sm_90a`), for compute capability 9.0.
pub const PTX_SM_90A: &str = include_str!(concat!(env!("OUT_DIR"), "/megakernel.sm_90a.ptx"));

/// The PTX to load on a GPU of compute capability `major.minor` (sm_80 or newer).
pub fn select(major: i32, minor: i32) -> (&'static str, &'static str) {
    if (major, minor) == (9, 0) {
        ("sm_90a", PTX_SM_90A)
    } else {
        ("compute_80", PTX_COMPUTE_80)
    }
}
