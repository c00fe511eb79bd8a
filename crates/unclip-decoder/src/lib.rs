//! unCLIP's decoder (Ramesh et al. 2022, §2.1): GLIDE's text-conditional ADM UNet with CLIP
//! conditioning, in the module layout of diffusers' UnCLIP decoder (`UNet2DConditionModel` +
//! `UnCLIPTextProjModel`), its guided sampler, and the `train-decoder` task.

pub mod added_kv_attention;
pub mod config;
pub mod model;
pub mod pretrained;
pub mod run;
pub mod sample;
pub mod task;
pub mod text_proj;
pub mod unet;

pub use added_kv_attention::AddedKvAttention;
pub use config::DecoderModelConfig;
pub use model::{DecoderCondition, UnclipDecoder};
pub use pretrained::{load_diffusers_decoder, save_diffusers_decoder, LoadedDecoder};
pub use run::DecoderRun;
pub use sample::DecoderSampler;
pub use text_proj::{ClipConditioning, TextProj};
pub use unet::{UNet, UNetConfig};
