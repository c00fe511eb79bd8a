//! unCLIP's two diffusion upsamplers (Ramesh et al. 2022, §2.1; SPEC: 64→256 and 256→1024):
//! attention-free ADM UNets in diffusers' `UNet2DModel` layout (the UnCLIP pipeline's
//! `super_res_first` / `super_res_last`) that denoise the high-resolution image with the
//! low-resolution one, upsampled, concatenated to their input. Trained on random crops with the
//! conditioning corrupted (Gaussian blur, or BSRGAN's degradations), sampled on the whole image.

pub mod config;
pub mod diffusers;
pub mod low_res;
pub mod model;
pub mod run;
pub mod sample;
pub mod task;

pub use config::UpsamplerModelConfig;
pub use low_res::{Corruption, LowResConfig};
pub use model::Upsampler;
pub use run::UpsamplerRun;
pub use sample::UpsamplerSampler;
