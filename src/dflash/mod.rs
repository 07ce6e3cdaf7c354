//! DFlash block-parallel speculative decoding (arXiv 2602.06036; reference
//! implementation github.com/z-lab/dflash): a small draft model conditioned
//! on the target's hidden states proposes a whole block of tokens at once,
//! the target verifies the block in one forward pass, and the longest
//! agreeing prefix is kept. Greedy output is exactly the target's own.
//!
//! [`DraftConfig`] and [`DraftModel`] load drafts in the reference layout;
//! [`DflashSession`] runs the draft → verify → accept loop on the device,
//! one command for `n` tokens.

pub mod config;
pub mod draft;
pub mod session;

pub use config::DraftConfig;
pub use draft::{write_random_draft, DraftModel};
pub use session::{DflashOptions, DflashSession, DflashStats, Injected};
