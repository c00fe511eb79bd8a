//! unCLIP's decoder (Ramesh et al. 2022, §2.1): GLIDE's text-conditional ADM UNet with CLIP
//! conditioning, in the module layout of diffusers' UnCLIP decoder (`UNet2DConditionModel` +
//! `UnCLIPTextProjModel`). In progress: the blocks specific to it, each checked against diffusers.

pub mod added_kv_attention;
pub mod model;
pub mod text_proj;
pub mod unet;

pub use added_kv_attention::AddedKvAttention;
pub use model::{DecoderCondition, UnclipDecoder};
pub use text_proj::{ClipConditioning, TextProj};
pub use unet::{UNet, UNetConfig};
