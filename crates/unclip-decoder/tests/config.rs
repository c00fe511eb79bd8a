//! The decoder's config: counting parameters without building, and errors that name the key.
use tch::{nn, Device};
use unclip_decoder::task::DecoderTrainConfig;
use unclip_decoder::{DecoderModelConfig, UnclipDecoder};
use unclip_train::config::parse_config;

fn model(yaml: &str) -> DecoderModelConfig {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn parameter_counts_from_the_config_equal_the_built_models() {
    let configs = [
        // Every level with attention, 1 layer, 2 levels.
        "clip_embeddings_dim: 16
unet: {block_out_channels: [16, 32], down_block_types: [SimpleCrossAttnDownBlock2D, SimpleCrossAttnDownBlock2D],
       up_block_types: [SimpleCrossAttnUpBlock2D, SimpleCrossAttnUpBlock2D], layers_per_block: 1,
       cross_attention_dim: 24, attention_head_dim: 8, norm_num_groups: 8}",
        // The UnCLIP layout (no attention at the top level), 3 levels, 2 layers, 6 extra tokens.
        "clip_embeddings_dim: 12
clip_extra_context_tokens: 6
unet: {block_out_channels: [8, 16, 24], down_block_types: [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D, SimpleCrossAttnDownBlock2D],
       up_block_types: [SimpleCrossAttnUpBlock2D, SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D], layers_per_block: 2,
       cross_attention_dim: 20, attention_head_dim: 4, norm_num_groups: 4}",
        // No attention anywhere but the middle block, equal widths, 3 input channels → 3 out.
        "clip_embeddings_dim: 8
unet: {out_channels: 3, block_out_channels: [16, 16, 32, 32], down_block_types: [ResnetDownsampleBlock2D, ResnetDownsampleBlock2D, ResnetDownsampleBlock2D, ResnetDownsampleBlock2D],
       up_block_types: [ResnetUpsampleBlock2D, ResnetUpsampleBlock2D, ResnetUpsampleBlock2D, ResnetUpsampleBlock2D], layers_per_block: 3,
       cross_attention_dim: 8, attention_head_dim: 8, norm_num_groups: 8}",
    ];
    for yaml in configs {
        let cfg = model(yaml);
        let vs = nn::VarStore::new(Device::Cpu);
        UnclipDecoder::from_config(vs.root(), &cfg).unwrap();
        let built = |prefix: &str| -> i64 {
            vs.variables()
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, t)| t.numel() as i64)
                .sum()
        };
        assert_eq!(cfg.unet.parameter_count(), built("decoder."), "{yaml}");
        assert_eq!(
            cfg.text_proj_parameter_count(),
            built("text_proj."),
            "{yaml}"
        );
    }
}

const VALID: &str = "
decoder:
  model:
    clip_embeddings_dim: 16
    unet:
      block_out_channels: [16, 32]
      down_block_types: [ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D]
      up_block_types: [SimpleCrossAttnUpBlock2D, ResnetUpsampleBlock2D]
      cross_attention_dim: 16
      attention_head_dim: 8
      norm_num_groups: 8
clip: runs/clip
data:
  train: a-000000.tar
  held_out: b-000000.tar
  embedding_dir: emb
  image: {resolution: 32}
";

fn error(overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match parse_config::<DecoderTrainConfig>(VALID, &o) {
        Ok(_) => panic!("{overrides:?} should be rejected"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn defaults_are_the_papers_and_bad_values_name_their_key() {
    let cfg = parse_config::<DecoderTrainConfig>(VALID, &[]).unwrap().task;
    let d = &cfg.decoder;
    assert_eq!((d.image_drop_prob, d.text_drop_prob), (0.1, 0.5));
    assert_eq!(d.model.clip_extra_context_tokens, 4);
    assert_eq!(
        (d.model.unet.layers_per_block, d.model.unet.out_channels),
        (3, 6)
    );
    assert_eq!(d.diffusion.timesteps, 1000);
    assert_eq!(d.diffusion.vlb_weight, 1e-3);

    let e = error(&["decoder.model.unet.attention_heads=4"]);
    assert!(e.contains("attention_heads"), "{e}");
    let e = error(&["decoder.text_drop_prob=1.0"]);
    assert!(e.contains("decoder.text_drop_prob"), "{e}");
    let e = error(&["decoder.model.unet.out_channels=3"]);
    assert!(e.contains("out_channels"), "{e}");
    let e = error(&["data.image.resolution=31"]);
    assert!(e.contains("data.image.resolution"), "{e}");
    let e = error(&["data.embedding_dir=null"]);
    assert!(e.contains("data.embedding_dir"), "{e}");
    let e = error(&[
        "decoder.model.unet.down_block_types=[ResnetDownsampleBlock2D, CrossAttnDownBlock2D]",
    ]);
    assert!(e.contains("CrossAttnDownBlock2D"), "{e}");
    let e = error(&["decoder.sampling.steps=2000"]);
    assert!(e.contains("decoder.sampling.steps"), "{e}");
    // SDEdit strengths must leave at least one of the sampling steps.
    for bad in ["[0.0]", "[1.5]", "[0.5, -0.1]", "[0.001]"] {
        let e = error(&[&format!("samples.denoise_strengths={bad}")]);
        assert!(e.contains("samples.denoise_strengths"), "{bad}: {e}");
    }
    let sets = ["samples.denoise_strengths=[0.004, 1.0]".to_string()];
    let cfg = parse_config::<DecoderTrainConfig>(VALID, &sets).unwrap();
    assert_eq!(cfg.task.samples.denoise_strengths, [0.004, 1.0]);
    // Self-conditioning doubles the UNet's input channels; each without the other is refused.
    let e = error(&["decoder.model.self_condition=true"]);
    assert!(
        e.contains("decoder.model.unet.in_channels") && e.contains("self_condition"),
        "{e}"
    );
    let e = error(&["decoder.model.unet.in_channels=6"]);
    assert!(e.contains("decoder.model.unet.in_channels"), "{e}");
    let sets = [
        "decoder.model.self_condition=true",
        "decoder.model.unet.in_channels=6",
    ];
    let cfg = parse_config::<DecoderTrainConfig>(VALID, &sets.map(String::from)).unwrap();
    assert!(cfg.task.decoder.model.self_condition);
}

#[test]
fn init_from_a_diffusers_pipeline_needs_its_model_and_says_which() {
    let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/pipeline");
    let init = format!("decoder.init_from={pipeline}");
    let e = error(&[&init]);
    assert!(
        e.contains("decoder.init_from") && e.contains("differs"),
        "{e}"
    );
    // The model the error prints is the one that fits.
    let theirs = e.rsplit("(YAML): ").next().unwrap();
    let cfg = parse_config::<DecoderTrainConfig>(VALID, &[init, format!("decoder.model={theirs}")])
        .unwrap()
        .task;
    assert_eq!(cfg.decoder.model.unet.cross_attention_dim, 24);
    assert_eq!(cfg.decoder.model.unet.layers_per_block, 2);
    let e = error(&["decoder.init_from=/nonexistent/pipeline"]);
    assert!(
        e.contains("/nonexistent/pipeline/decoder/config.json"),
        "{e}"
    );
}
