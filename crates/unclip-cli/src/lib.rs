//! What the binaries share beyond the model crates: the text-to-image pipeline `sample` runs and
//! the held-out scores `evaluate` reports and the diffusers directory `export` writes.

pub mod evaluate;
pub mod export;
pub mod pipeline;
