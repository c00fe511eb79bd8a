//! What the binaries share beyond the model crates: the text-to-image pipeline `sample` runs and
//! the held-out scores `evaluate` reports.

pub mod evaluate;
pub mod pipeline;
