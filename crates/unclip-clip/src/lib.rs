//! CLIP for unCLIP: the encoders (transformers' `CLIPModel` names), open_clip / OpenAI weight
//! conversion, the symmetric contrastive loss, the `train-clip` task, and the caption
//! conditioning (z_t, token features) the prior and the decoder share.

pub mod caption;
pub mod config;
pub mod convert;
pub mod load;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod resnet;
pub mod task;

pub use config::{Activation, ClipConfig, TextConfig, VisionConfig};
pub use model::{init_clip_weights, Clip, TextFeatures};
