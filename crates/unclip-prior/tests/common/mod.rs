//! The synthetic embedding dataset and run helpers the prior training tests share: 8 concepts, each
//! with its own random image-embedding direction unrelated to z_t.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::CaptionEncoder;
use unclip_data::embeddings::{write_embedding_shard, EmbeddingSample};
use unclip_data::npy::{NpyArray, NpyData};
use unclip_prior::task::{PriorTask, PriorTrainConfig};
use unclip_train::config::parse_config;
use unclip_train::RunConfig;

/// Tests here use libtorch's global generator; they take turns.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

use unclip_clip::load::TINY_CLIP_CONFIG as CLIP;
const CONCEPTS: [&str; 8] = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "two yellow stars",
    "a small purple heart",
    "an orange ring on grey",
    "three cyan dots",
    "a large white cross",
];

/// CLIP run, train shards (2 × 512) and held-out shard (64) under `dir`. With `mix_text`, each
/// z_i also leans towards its caption's z_t by a random amount, so z_i · z_t varies within a
/// caption.
pub fn dataset_with(dir: &Path, with_tokens: bool, mix_text: bool) -> PathBuf {
    let clip = dir.join("clip");
    unclip_clip::load::write_random_run(&clip, CLIP, 1).unwrap();
    let encoder = CaptionEncoder::load(&clip, Device::Cpu).unwrap();
    let text = encoder.encode(&CONCEPTS).unwrap();
    tch::manual_seed(7);
    let targets =
        unclip_diffusion::l2_normalize(&Tensor::randn([8, 32], (Kind::Float, Device::Cpu)))
            .unwrap();
    let mut sample = |i: usize| -> EmbeddingSample {
        let c = i % 8;
        let mut noisy =
            targets.get(c as i64) + Tensor::randn([32], (Kind::Float, Device::Cpu)) * 0.03;
        if mix_text {
            let z_t = unclip_diffusion::l2_normalize(&text.text_embeds.get(c as i64).unsqueeze(0))
                .unwrap()
                .squeeze();
            noisy += z_t * (Tensor::rand([1], (Kind::Float, Device::Cpu)) * 1.5);
        }
        let z_i = unclip_diffusion::l2_normalize(&noisy.unsqueeze(0)).unwrap();
        let len = text.mask.get(c as i64).sum(Kind::Int64).int64_value(&[]);
        let tokens = text.tokens.get(c as i64).narrow(0, 0, len).contiguous();
        let tokens: Vec<f16> = Vec::<f32>::try_from(&tokens.flatten(0, -1))
            .unwrap()
            .into_iter()
            .map(f16::from_f32)
            .collect();
        EmbeddingSample {
            key: format!("{i:06}"),
            caption: CONCEPTS[c].to_string(),
            image_emb: Vec::try_from(&z_i.view([-1])).unwrap(),
            text_emb: Vec::try_from(&text.text_embeds.get(c as i64)).unwrap(),
            text_tokens: with_tokens.then(|| NpyArray {
                shape: vec![len as usize, 32],
                data: NpyData::F16(tokens),
            }),
        }
    };
    let data = dir.join("emb");
    std::fs::create_dir_all(&data).unwrap();
    for s in 0..2 {
        let samples: Vec<_> = (s * 512..(s + 1) * 512).map(&mut sample).collect();
        write_embedding_shard(&data.join(format!("train-{s:06}.tar")), &samples).unwrap();
    }
    let held: Vec<_> = (10_000..10_064).map(&mut sample).collect();
    write_embedding_shard(&data.join("val-000000.tar"), &held).unwrap();
    dir.to_path_buf()
}

pub fn dataset(dir: &Path, with_tokens: bool) -> PathBuf {
    dataset_with(dir, with_tokens, false)
}

/// The diffusion prior's section of the test configs.
pub const DIFFUSION: &str = "
  model: {num_attention_heads: 2, attention_head_dim: 16, num_layers: 2, embedding_dim: 32, num_embeddings: 16}
  sampling: {sampler: ddim, steps: '16', clip: {static: 10.0}}";

pub fn config(dir: &Path, steps: u64, text_features: &str) -> RunConfig<PriorTrainConfig> {
    config_with(dir, steps, text_features, DIFFUSION)
}

/// A run of `steps` on the dataset under `dir` with `prior` as the `prior:` section's body.
pub fn config_with(
    dir: &Path,
    steps: u64,
    text_features: &str,
    prior: &str,
) -> RunConfig<PriorTrainConfig> {
    let yaml = format!(
        "
seed: 3
device: cpu
prior:{prior}
clip: {clip}
data:
  train: {emb}/train-{{000000..000001}}.tar
  held_out: {emb}/val-000000.tar
  text_features: {text_features}
  shuffle_buffer: 256
  stats_samples: 512
eval: {{every: 0, count: 64, guidance_scales: [1.0, 3.0]}}
train: {{steps: {steps}, batch_size: 64, lr: 2.0e-3, warmup_steps: 20, grad_clip: 1.0, ema_decay: 0.99}}
logging: {{every: 1000, tensorboard: false, progress: off}}
checkpoint: {{every: 10, keep_last: 3}}
",
        clip = dir.join("clip").display(),
        emb = dir.join("emb").display(),
    );
    parse_config(&yaml, &[]).unwrap()
}

pub fn train(
    cfg: &RunConfig<PriorTrainConfig>,
    run: &Path,
    resume: bool,
) -> (nn::VarStore, PriorTask, unclip_train::TrainSummary) {
    tch::manual_seed(cfg.runtime.seed as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut task = PriorTask::new(&vs, &cfg.task, cfg.runtime.seed, 64, 0, 1).unwrap();
    let summary = unclip_train::train(
        &mut task,
        &vs,
        &cfg.runtime,
        &cfg.resolved,
        run,
        resume.then_some("auto"),
    )
    .unwrap();
    (vs, task, summary)
}
