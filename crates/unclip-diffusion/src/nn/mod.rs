//! Neural building blocks shared by the priors, the decoder and the upsamplers. Module paths
//! follow diffusers' names (`norm1`, `conv1`, `time_emb_proj`, `to_q`, `to_out.0`, …) so state
//! dicts map one to one.

pub mod attention;
pub mod checkpoint;
pub mod init;
pub mod norm_act;
pub mod resample;
pub mod resnet;
pub mod timestep;
pub mod transformer;

pub use attention::{AttentionMask, KvCache, MultiHeadAttention};
pub use checkpoint::{checkpoint, checkpoint_one, Shared};
pub use norm_act::{group_norm_act, group_norm_act_composite};
pub use resample::{upsample_conv3x3, upsample_nearest, Downsample, Upsample};
pub use resnet::{ResBlock, ResBlockConfig, Resample};
pub use timestep::{timestep_embedding, TimestepMlp};
pub use transformer::TransformerBlock;
