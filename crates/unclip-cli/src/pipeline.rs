//! unCLIP's text-to-image sampling (SPEC.md, *Text-to-image sampling*): caption → CLIP text
//! encoder (z_t, token features) → prior (its own guidance scale, candidates reranked by
//! z_i · z_t) → decoder (its own guidance scale) → upsamplers (none, one or both of unCLIP's two
//! stages; no guidance). Without a prior the decoder is given z_t as its image embedding: the
//! paper's zero-shot baseline, or, for a decoder trained on z_t (`decoder.embedding: text`),
//! its text-embedding decoder baseline.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Context, Result};
use tch::{Device, Kind, Tensor};
use unclip_clip::caption::{CaptionEncoder, TextCondition};
use unclip_decoder::task::ConditioningEmbedding;
use unclip_decoder::{DecoderCondition, DecoderRun, DecoderSampler};
use unclip_diffusion::SamplerConfig;
use unclip_prior::load::{load_prior_run, PriorRun};
use unclip_prior::{Prior, PriorSampling};
use unclip_train::config::with_keys;
use unclip_train::precision::{autocast, Precision};
use unclip_upsampler::UpsamplerRun;

use crate::evaluate::unit;

/// A prior run and a decoder run trained on the same frozen CLIP.
pub struct Pipeline {
    pub encoder: CaptionEncoder,
    pub prior: Option<PriorRun>,
    pub decoder: DecoderRun,
    /// Upsampling stages after the decoder, in order (see [`Pipeline::with_upsamplers`]).
    pub upsamplers: Vec<UpsamplerRun>,
    /// The empty caption's condition, guidance's null branch for both stages.
    pub(crate) null: TextCondition,
    device: Device,
}

/// How [`Pipeline::generate`] samples; [`Pipeline::default_options`] takes each stage's from its
/// run's config.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Images per caption.
    pub count: usize,
    pub prior_guidance: f64,
    /// Prior draws per image, the one with the highest z_i · z_t kept.
    pub candidates: usize,
    pub prior_sampling: PriorSampling,
    pub decoder_guidance: f64,
    pub decoder_sampling: SamplerConfig,
    /// One per upsampler, in order.
    pub upsampler_sampling: Vec<SamplerConfig>,
    /// Seed of all sampling noise: the same seed, options and batch size give the same images.
    pub seed: i64,
    /// How the noise is drawn from `seed`.
    pub noise: NoiseOrder,
    /// Images decoded at once.
    pub batch_size: usize,
    /// `auto`: bf16 autocast on CUDA and AMX CPUs, fp32 elsewhere (the trainers' rule).
    pub precision: Precision,
}

/// How [`Pipeline::generate`] draws its noise from the seed (`sample --noise`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseOrder {
    /// Each stage from the seed afresh (upsampler k from seed + 1 + k), so that a stage's noise
    /// is the same whatever came before it: runs with and without the prior, or with other prior
    /// options, decode from the same noise.
    #[default]
    Stages,
    /// One generator seeded once and drawn in diffusers' UnCLIPPipeline's order — each stage's
    /// x_T, then one draw per step but the last — so that a pipeline directory gives, on the CPU
    /// in fp32, the images diffusers gives for `generator=torch.Generator().manual_seed(seed)`.
    /// All images in one batch, one prior candidate (as diffusers).
    Diffusers,
}

impl std::str::FromStr for NoiseOrder {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "stages" => Ok(Self::Stages),
            "diffusers" => Ok(Self::Diffusers),
            other => Err(anyhow!("--noise {other:?}: expected stages or diffusers")),
        }
    }
}

impl PipelineOptions {
    /// Changes the keys each YAML mapping names in the prior's sampling, the decoder's sampler
    /// and every upsampler's sampler (`sample` and `evaluate`'s `--prior-sampling`,
    /// `--decoder-sampling`, `--upsampler-sampling`); errors name the flag.
    pub fn override_sampling(
        &mut self,
        prior: Option<&str>,
        decoder: Option<&str>,
        upsampler: Option<&str>,
    ) -> Result<()> {
        if let Some(yaml) = prior {
            self.prior_sampling = self.prior_sampling.with_keys("--prior-sampling", yaml)?;
        }
        if let Some(yaml) = decoder {
            self.decoder_sampling = with_keys("--decoder-sampling", &self.decoder_sampling, yaml)?;
        }
        if let Some(yaml) = upsampler {
            self.upsampler_sampling = self
                .upsampler_sampling
                .iter()
                .map(|s| with_keys("--upsampler-sampling", s, yaml))
                .collect::<Result<_>>()?;
        }
        Ok(())
    }
}

/// Checks a sampler and its steps against a process of `timesteps`; errors name the `what` stage.
pub(crate) fn check_sampler(what: &str, s: &SamplerConfig, timesteps: usize) -> Result<()> {
    s.validate().map_err(|e| anyhow!("{what} sampling: {e}"))?;
    s.steps
        .timesteps(timesteps)
        .map_err(|e| anyhow!("{what} sampling steps: {e}"))?;
    Ok(())
}

/// `--precision`: fp32, bf16, fp16 or auto.
pub fn parse_precision(text: &str) -> Result<Precision> {
    serde_yaml::from_str(text)
        .map_err(|_| anyhow!("--precision {text:?}: expected fp32, bf16, fp16 or auto"))
}

/// What [`Pipeline::generate`] made; rows are caption-major (caption i, draw k at i·count + k).
pub struct Generated {
    /// [N, 3, H, W] in [-1, 1]: the last stage's (the decoder's, or the last upsampler's).
    pub images: Tensor,
    /// [N, D]: the image embeddings decoded (the prior's samples, z_t, or those given).
    pub image_embeds: Tensor,
    /// [N]: the kept prior candidate's z_i · z_t (None without a prior).
    pub prior_scores: Option<Tensor>,
    /// [N, C]: cos(CLIP image embedding of (final) image n, z_t of caption c) for each of the C captions.
    pub clip_text: Tensor,
    /// [N]: cos(CLIP image embedding of the image, the z_i it was decoded from).
    pub clip_image: Tensor,
    /// [N, D]: the CLIP image embeddings of the (final) images, L2-normalised.
    pub image_clip_embeds: Tensor,
}

/// Refuses `what` for a decoder trained on text embeddings (`decoder.embedding: text`).
fn expects_image_embeddings(decoder: &DecoderRun, what: &str) -> Result<()> {
    ensure!(
        decoder.cfg.decoder.embedding == ConditioningEmbedding::Image,
        "{what} needs a decoder conditioned on image embeddings; {} was trained on text \
         embeddings (decoder.embedding: text)",
        decoder.source
    );
    Ok(())
}

/// Whether two `clip:` settings name the same CLIP (same directory once resolved).
fn same_clip(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Pipeline {
    /// The decoder of `decoder_run` (a `train-decoder` run directory; `decoder_checkpoint`, or its
    /// newest checkpoint, EMA weights) behind the prior of `prior_run` (a `train-prior` run
    /// directory, newest checkpoint) or, with none, behind z_t. The CLIP is the decoder config's
    /// `clip:`, which the prior's must name too.
    pub fn load(
        prior_run: Option<&Path>,
        decoder_run: &Path,
        decoder_checkpoint: Option<&Path>,
        device: Device,
    ) -> Result<Self> {
        let decoder = DecoderRun::load(decoder_run, decoder_checkpoint, device)
            .with_context(|| format!("decoder run {}", decoder_run.display()))?;
        let clip = decoder.cfg.clip.clone();
        let prior = match prior_run {
            Some(dir) => {
                expects_image_embeddings(&decoder, "a prior (it decodes a caption's z_t)")?;
                let run = load_prior_run(dir, None, device)
                    .with_context(|| format!("prior run {}", dir.display()))?;
                ensure!(
                    same_clip(&run.cfg.clip, &clip),
                    "the prior run {} was trained on the CLIP {} and the decoder run {} on {}: \
                     the decoder can only read image embeddings of its own CLIP",
                    dir.display(),
                    run.cfg.clip.display(),
                    decoder_run.display(),
                    clip.display()
                );
                let (prior_scale, decoder_scale) = (
                    run.cfg.prior.clip_embeddings,
                    decoder.cfg.decoder.clip_embeddings,
                );
                ensure!(
                    prior_scale == decoder_scale,
                    "the prior run {} samples {} embeddings (prior.clip_embeddings) and the \
                     decoder run {} was trained on {} ones (decoder.clip_embeddings): train both \
                     on the same",
                    dir.display(),
                    prior_scale.name(),
                    decoder_run.display(),
                    decoder_scale.name()
                );
                Some(run)
            }
            None => None,
        };
        let name = format!(
            "{} (the clip: of {})",
            clip.display(),
            decoder_run.join("config.yaml").display()
        );
        let encoder = CaptionEncoder::load_with(&clip, device, decoder.cfg.decoder.clip_embeddings)
            .with_context(|| format!("clip {name}"))?;
        Self::assemble(encoder, &name, prior, decoder, Vec::new(), device)
    }

    /// Loaded stages behind `encoder` (`name`: the CLIP, for errors): checks that the CLIP fits
    /// the prior and the decoder and encodes guidance's null caption.
    pub(crate) fn assemble(
        encoder: CaptionEncoder,
        name: &str,
        prior: Option<PriorRun>,
        decoder: DecoderRun,
        upsamplers: Vec<UpsamplerRun>,
        device: Device,
    ) -> Result<Self> {
        unclip_decoder::task::check_clip_fits(&encoder, &decoder.cfg.decoder.model, name)?;
        if let Some(run) = &prior {
            unclip_prior::task::check_clip_fits(&encoder, &run.cfg.prior, name)?;
        }
        let null = encoder.null_condition()?;
        Ok(Self {
            encoder,
            prior,
            decoder,
            upsamplers,
            null,
            device,
        })
    }

    /// Appends upsampling stages (`train-upsampler` run directories, newest checkpoints, EMA
    /// weights), in order: each must take the side the stage before produces.
    pub fn with_upsamplers(mut self, runs: &[PathBuf]) -> Result<Self> {
        let mut side = self.decoder.resolution();
        let mut from = "the decoder".to_string();
        for dir in runs {
            let run = UpsamplerRun::load(dir, None, self.device)
                .with_context(|| format!("upsampler run {}", dir.display()))?;
            ensure!(
                run.low_resolution() == side,
                "the upsampler run {} takes {} px images but {from} makes {side} px ones",
                dir.display(),
                run.low_resolution()
            );
            side = run.resolution();
            from = format!("the upsampler run {}", dir.display());
            self.upsamplers.push(run);
        }
        Ok(self)
    }

    /// Refuses `what` when the decoder was trained on text embeddings (`decoder.embedding:
    /// text`), which it must be given in place of z_i.
    pub fn expects_image_embeddings(&self, what: &str) -> Result<()> {
        expects_image_embeddings(&self.decoder, what)
    }

    /// Where the models live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The side of the images [`Pipeline::generate`] returns.
    pub fn resolution(&self) -> i64 {
        self.upsamplers
            .last()
            .map_or(self.decoder.resolution(), UpsamplerRun::resolution)
    }

    /// Each stage's guidance scale, candidates and sampler from its run's config; 4 images per
    /// caption, seed 0, 16 at once, precision `auto`.
    pub fn default_options(&self) -> PipelineOptions {
        let d = &self.decoder.cfg.decoder;
        let (prior_guidance, candidates, prior_sampling) = match &self.prior {
            Some(run) => {
                let p = &run.cfg.prior;
                (p.guidance_scale, p.candidates, run.model.sampling(p))
            }
            None => (
                1.0,
                1,
                PriorSampling::Diffusion(unclip_prior::task::default_sampling()),
            ),
        };
        PipelineOptions {
            count: 4,
            prior_guidance,
            candidates,
            prior_sampling,
            decoder_guidance: d.guidance_scale,
            decoder_sampling: d.sampling.clone(),
            upsampler_sampling: self.upsampler_samplings(),
            seed: 0,
            noise: NoiseOrder::Stages,
            batch_size: 16,
            precision: Precision::Auto,
        }
    }

    /// Each upsampler's sampler from its run's config, in order.
    pub fn upsampler_samplings(&self) -> Vec<SamplerConfig> {
        self.upsamplers
            .iter()
            .map(|u| u.cfg.upsampler.sampling.clone())
            .collect()
    }

    /// Checks one sampler per upsampler, each against its process.
    pub(crate) fn check_upsampler_samplings(&self, samplings: &[SamplerConfig]) -> Result<()> {
        ensure!(
            samplings.len() == self.upsamplers.len(),
            "{} upsampler samplers for {} upsamplers",
            samplings.len(),
            self.upsamplers.len()
        );
        for (run, s) in self.upsamplers.iter().zip(samplings) {
            check_sampler("upsampler", s, run.cfg.upsampler.diffusion.timesteps)?;
        }
        Ok(())
    }

    /// Checks `o` against the runs; errors name the option.
    pub fn check(&self, o: &PipelineOptions) -> Result<()> {
        ensure!(o.count >= 1, "count must be at least 1");
        ensure!(o.batch_size >= 1, "batch size must be at least 1");
        ensure!(o.candidates >= 1, "candidates must be at least 1");
        for (what, g) in [
            ("prior guidance", o.prior_guidance),
            ("decoder guidance", o.decoder_guidance),
        ] {
            ensure!(
                g.is_finite() && g >= 0.0,
                "{what} must be finite and >= 0, got {g}"
            );
        }
        check_sampler(
            "decoder",
            &o.decoder_sampling,
            self.decoder.cfg.decoder.diffusion.timesteps,
        )?;
        self.check_upsampler_samplings(&o.upsampler_sampling)?;
        match (&self.prior, &o.prior_sampling) {
            (Some(run), PriorSampling::Diffusion(s)) => {
                ensure!(
                    matches!(run.model, Prior::Diffusion(_)),
                    "prior sampling: a diffusion sampler for the autoregressive prior of {}",
                    run.source
                );
                check_sampler("prior", s, run.cfg.prior.diffusion.timesteps)?;
            }
            (Some(run), PriorSampling::Autoregressive(s)) => {
                ensure!(
                    matches!(run.model, Prior::Autoregressive(_)),
                    "prior sampling: autoregressive settings for the diffusion prior of {}",
                    run.source
                );
                s.validate().map_err(|e| anyhow!("prior sampling: {e}"))?;
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// `o.count` images for each caption.
    pub fn generate<S: AsRef<str>>(
        &self,
        captions: &[S],
        o: &PipelineOptions,
    ) -> Result<Generated> {
        self.generate_from(captions, None, o)
    }

    /// As [`Pipeline::generate`], but with `image_embeds` ([captions, D], one per caption) the
    /// decoder decodes those instead of the prior's samples or z_t: given the real images'
    /// embeddings, the decoder's ceiling (how well it inverts CLIP).
    pub fn generate_from<S: AsRef<str>>(
        &self,
        captions: &[S],
        image_embeds: Option<&Tensor>,
        o: &PipelineOptions,
    ) -> Result<Generated> {
        ensure!(!captions.is_empty(), "no captions to sample");
        if let Some(z) = image_embeds {
            self.expects_image_embeddings("decoding given image embeddings")?;
            ensure!(
                z.size() == [captions.len() as i64, self.encoder.embed_dim()],
                "{:?} image embeddings for {} captions of a {}-wide CLIP",
                z.size(),
                captions.len(),
                self.encoder.embed_dim()
            );
        }
        self.check(o)?;
        let n = (captions.len() * o.count) as i64;
        if o.noise == NoiseOrder::Diffusers {
            // diffusers draws each step's noise for the whole batch and one prior candidate.
            ensure!(
                o.batch_size as i64 >= n && o.candidates == 1,
                "--noise diffusers draws as diffusers' pipeline does: all {n} images in one \
                 batch (--batch-size {n} or more, not {}) and one prior candidate (not {})",
                o.batch_size,
                o.candidates
            );
        }
        let _g = tch::no_grad_guard();
        let precision = unclip_train::precision::resolve(o.precision, self.device).precision;
        let _autocast = autocast(self.device, precision);
        // Each caption encoded once, then repeated: caption-major rows.
        let rows = Tensor::arange(captions.len() as i64, (Kind::Int64, self.device))
            .repeat_interleave_self_int(o.count as i64, 0, None);
        let encoded = self.encoder.encode(captions)?;
        let text = encoded.index_select(&rows)?;
        tch::manual_seed(o.seed);
        let (image_embeds, prior_scores) = match (image_embeds, &self.prior) {
            (Some(z), _) => (
                z.to_device(self.device)
                    .to_kind(Kind::Float)
                    .index_select(0, &rows),
                None,
            ),
            (None, Some(run)) => {
                let s = run.model.sample(
                    &run.cfg.prior,
                    &o.prior_sampling,
                    &text,
                    &self.null,
                    o.prior_guidance,
                    o.candidates,
                )?;
                let best = s.scores.max_dim(1, false).0.to_kind(Kind::Float);
                (s.image_embeds.to_kind(Kind::Float), Some(best))
            }
            (None, None) => (text.text_embeds.to_kind(Kind::Float), None),
        };
        // The decoder's noise from the seed again, so that runs with and without the prior (or
        // with other prior options) decode from the same noise.
        if o.noise == NoiseOrder::Stages {
            tch::manual_seed(o.seed);
        }
        let r = self.decoder.resolution();
        let noise = Tensor::randn([n, 3, r, r], (Kind::Float, self.device));
        let d = &self.decoder.cfg.decoder;
        let sampler = DecoderSampler::new(&self.decoder.model, &d.diffusion, &o.decoder_sampling)?;
        let images = in_chunks(n, o.batch_size, |start, len| {
            let index = Tensor::arange_start(start, start + len, (Kind::Int64, self.device));
            let cond = DecoderCondition {
                image_embeds: image_embeds.narrow(0, start, len),
                text: text.index_select(&index)?,
            };
            sampler.sample(
                &cond,
                &self.null,
                o.decoder_guidance,
                noise.narrow(0, start, len),
            )
        })?;
        let seed = (o.noise == NoiseOrder::Stages).then_some(o.seed);
        let images = self.upsample_all(images, &o.upsampler_sampling, seed, o.batch_size)?;
        // Cosines, whichever scale the stages take their embeddings at.
        let z_x = unit(&self.encoder.clip.embed_images(&images)?)?;
        let z_t = unit(&encoded.text_embeds)?;
        Ok(Generated {
            clip_text: z_x.matmul(&z_t.tr()),
            clip_image: (&z_x * unit(&image_embeds)?).sum_dim_intlist(-1, false, Kind::Float),
            image_clip_embeds: z_x,
            images,
            image_embeds,
            prior_scores,
        })
    }

    /// Stage `stage`'s upsampling of `low` [N, 3, h, w], `batch_size` at a time, its noise drawn
    /// from `seed` (offset by the stage) so that each stage's is fixed whatever came before, or
    /// with no seed from the generator as it stands ([`NoiseOrder::Diffusers`]).
    fn upsample(
        &self,
        run: &UpsamplerRun,
        sampling: &SamplerConfig,
        low: &Tensor,
        seed: Option<i64>,
        batch_size: usize,
        stage: usize,
    ) -> Result<Tensor> {
        let sampler = run.sampler(sampling)?;
        if let Some(seed) = seed {
            tch::manual_seed(seed.wrapping_add(1 + stage as i64));
        }
        let (n, r) = (low.size()[0], run.resolution());
        let noise = Tensor::randn([n, 3, r, r], (Kind::Float, self.device));
        in_chunks(n, batch_size, |start, len| {
            sampler.upsample(&low.narrow(0, start, len), noise.narrow(0, start, len))
        })
    }

    /// `images` through every upsampler in order, stage k sampled with `samplings[k]` (no
    /// upsamplers: unchanged); `seed` as [`Pipeline::upsample`] takes it.
    pub(crate) fn upsample_all(
        &self,
        images: Tensor,
        samplings: &[SamplerConfig],
        seed: Option<i64>,
        batch_size: usize,
    ) -> Result<Tensor> {
        let mut images = images;
        for (k, (run, sampling)) in self.upsamplers.iter().zip(samplings).enumerate() {
            images = self.upsample(run, sampling, &images, seed, batch_size, k)?;
        }
        Ok(images)
    }
}

/// `f(start, len)` over `n` rows `batch` at a time (no gradients), the results concatenated.
pub(crate) fn in_chunks(
    n: i64,
    batch: usize,
    mut f: impl FnMut(i64, i64) -> Result<Tensor>,
) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = (batch as i64).min(n - start);
        out.push(f(start, len)?);
        start += len;
    }
    Ok(Tensor::f_cat(&out, 0)?)
}

/// Where `sample` writes image k of caption i: `dir/NNN_KK.png`.
pub fn image_path(dir: &Path, caption: usize, draw: usize) -> PathBuf {
    dir.join(format!("{caption:03}_{draw:02}.png"))
}
