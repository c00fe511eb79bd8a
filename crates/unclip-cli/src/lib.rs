//! What the binaries share beyond the model crates: the text-to-image pipeline and the image
//! manipulations `sample` runs, the held-out scores `evaluate` reports and the diffusers directory
//! `export` writes.

pub mod diffusers_pipeline;
pub mod evaluate;
pub mod export;
pub mod manipulate;
pub mod pipeline;
