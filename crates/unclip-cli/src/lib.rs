//! What the binaries share beyond the model crates: the text-to-image pipeline `sample` runs.

pub mod pipeline;
