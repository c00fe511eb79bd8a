//! CLIP embeddings of a WebDataset: one embedding shard per image shard, same file name and keys
//! (layout: `unclip_data::embeddings`). Resumable: shards already written are skipped.
//!
//!     embed --clip runs/clip-shapes --shards 'data/shapes/clip32-{000000..000019}.tar' --out data/shapes/emb

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};
use unclip_clip::load::load_clip;
use unclip_data::embeddings::{
    embedding_shard_for, parse_embedding_sample, write_embedding_shard, ClipEmbeddings,
    EmbeddingSample,
};
use unclip_data::npy::{NpyArray, NpyData};
use unclip_data::reader::{is_streamed, shard_list, ReaderConfig, ShardReader};
use unclip_data::tokenizer::ClipTokenizer;
use unclip_diffusion::device::parse_device;

#[derive(Parser)]
#[command(about = "Write CLIP image and text embeddings of captioned-image shards")]
struct Cli {
    /// A train-clip run directory, or a Hugging Face CLIP directory (config.json + model.safetensors).
    #[arg(long)]
    clip: PathBuf,
    /// Image shards, brace-expanded.
    #[arg(long)]
    shards: String,
    /// Directory for the embedding shards.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Also store the text encoder's per-token features (float16), for the priors.
    #[arg(long)]
    token_features: bool,
    /// Store z_i and z_t as the CLIP's projections give them instead of L2-normalised: what
    /// diffusers' UnCLIP pipeline feeds Karlo's prior and decoder (their `clip_embeddings: raw`).
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let device = parse_device(&cli.device)?;
    let out = cli.out.to_string_lossy();
    ensure!(
        !is_streamed(&out) && !out.contains("{}"),
        "--out {out}: embed writes its shards into a local directory; upload them from there \
         (the trainers' data.embedding_dir may be a URL)"
    );
    let shards = shard_list(&cli.shards)?;
    let convention = if cli.raw {
        ClipEmbeddings::Raw
    } else {
        ClipEmbeddings::Normalized
    };
    let clip = load_clip(&cli.clip, device)?.with_embeddings(convention);
    let tokenizer = ClipTokenizer::new();
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    eprintln!("embedding {} shards with {}", shards.len(), clip.source);
    let bar = ProgressBar::new(shards.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} shards {msg} [{elapsed} < {eta}]")
            .context("progress template")?,
    );
    let (mut written, mut resumed, mut samples, mut skipped) = (0, 0, 0u64, 0u64);
    let mut failed = Vec::new();
    let ctx = clip.model.cfg.text.context_length as usize;
    check_resumed_convention(&shards, &cli.out, convention)?;
    for shard in &shards {
        let out = embedding_shard_for(shard, &cli.out)?;
        if out.exists() {
            resumed += 1;
            bar.inc(1);
            continue;
        }
        let reader = ShardReader::new(&ReaderConfig::in_order(shard.display().to_string()), 0)?;
        let raw: Vec<_> = reader.iter().collect();
        let errors = reader.errors();
        if raw.is_empty() && !errors.is_empty() {
            // Nothing read (a failed download, a missing object): no shard is written, so a
            // rerun tries it again instead of taking an empty one as done.
            bar.println(format!(
                "{}: not read, left for a rerun: {}",
                shard.display(),
                errors.join(" | ")
            ));
            failed.push(shard.display().to_string());
            bar.inc(1);
            continue;
        }
        if !errors.is_empty() {
            bar.println(format!(
                "{}: read errors, embedding the {} samples read: {}",
                shard.display(),
                raw.len(),
                errors.join(" | ")
            ));
        }
        skipped += reader.skipped();
        let mut result = Vec::with_capacity(raw.len());
        for chunk in raw.chunks(cli.batch_size) {
            let encoded: Vec<&[u8]> = chunk.iter().map(|s| s.image.as_slice()).collect();
            let decoded = clip.image.apply_all(&encoded);
            let good: Vec<(usize, Vec<f32>)> = decoded
                .into_iter()
                .enumerate()
                .filter_map(|(i, px)| match px {
                    Ok(p) => Some((i, p)),
                    Err(e) => {
                        bar.println(format!(
                            "{}: sample {} skipped: {e}",
                            shard.display(),
                            chunk[i].key
                        ));
                        None
                    }
                })
                .collect();
            skipped += (chunk.len() - good.len()) as u64;
            if good.is_empty() {
                continue;
            }
            let n = good.len() as i64;
            let (rows, pixels): (Vec<usize>, Vec<Vec<f32>>) = good.into_iter().unzip();
            let captions: Vec<&str> = rows.iter().map(|&i| chunk[i].caption.as_str()).collect();
            let ids = Tensor::from_slice(&tokenizer.tokenize_batch(&captions, ctx))
                .view([n, ctx as i64])
                .to_device(device);
            let img = clip.embed_transformed(&pixels, pixels.len())?;
            let (txt, tokens) = tch::no_grad(|| -> Result<_> {
                let text = clip.model.encode_text(&ids)?;
                Ok((clip.convention(&text.embeds)?, text.tokens))
            })?;
            let to_vecs = |t: &Tensor| -> Result<Vec<Vec<f32>>> {
                let t = t.to_kind(Kind::Float).to_device(Device::Cpu);
                Ok(Vec::<Vec<f32>>::try_from(&t)?)
            };
            let (img, txt) = (to_vecs(&img)?, to_vecs(&txt)?);
            let ends: Vec<i64> = Vec::try_from(&ids.argmax(-1, false).to_device(Device::Cpu))?;
            for (row, i) in rows.iter().enumerate() {
                let text_tokens = if cli.token_features {
                    let len = ends[row] + 1;
                    let t = tokens
                        .get(row as i64)
                        .narrow(0, 0, len)
                        .to_kind(Kind::Half)
                        .to_device(Device::Cpu)
                        .contiguous();
                    let width = t.size()[1] as usize;
                    let values: Vec<f16> = Vec::try_from(&t.flatten(0, -1))?;
                    Some(NpyArray {
                        shape: vec![len as usize, width],
                        data: NpyData::F16(values),
                    })
                } else {
                    None
                };
                result.push(EmbeddingSample {
                    key: chunk[*i].key.clone(),
                    caption: chunk[*i].caption.clone(),
                    image_emb: img[row].clone(),
                    text_emb: txt[row].clone(),
                    text_tokens,
                });
            }
        }
        samples += result.len() as u64;
        write_embedding_shard(&out, &result)?;
        written += 1;
        bar.set_message(format!("{samples} samples, {skipped} skipped"));
        bar.inc(1);
    }
    bar.finish();
    println!(
        "wrote {written} embedding shards to {} ({resumed} already there): {samples} samples embedded, {skipped} skipped (unreadable or undecodable)",
        cli.out.display()
    );
    ensure!(
        failed.is_empty(),
        "{} shards could not be read and were not written ({}); rerun the same command to embed \
         them, the shards written are kept",
        failed.len(),
        failed.join(", ")
    );
    Ok(())
}

/// A rerun resumes into `out`: the shards already there must hold the convention this run writes,
/// or one directory would mix normalised and raw embeddings.
fn check_resumed_convention(
    shards: &[PathBuf],
    out: &std::path::Path,
    convention: ClipEmbeddings,
) -> Result<()> {
    for shard in shards {
        let done = embedding_shard_for(shard, out)?;
        if !done.exists() {
            continue;
        }
        let cfg = ReaderConfig::in_order(done.display().to_string());
        let reader = ShardReader::with_parser(&cfg, 0, parse_embedding_sample)?;
        let samples: Vec<EmbeddingSample> = reader.iter().take(64).collect();
        let (held, written) = match convention {
            ClipEmbeddings::Raw => ("L2-normalised", "raw ones (--raw)"),
            ClipEmbeddings::Normalized => ("raw", "L2-normalised ones (no --raw)"),
        };
        ensure!(
            convention.check(&samples, "clip_embeddings").is_ok(),
            "{} (written earlier) holds {held} embeddings and this run writes {written}: one \
             directory would mix the two; embed into another --out",
            done.display()
        );
        return Ok(());
    }
    Ok(())
}
