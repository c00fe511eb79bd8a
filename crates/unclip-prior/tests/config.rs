//! The priors' configs: sizes counted from a config equal the built model's (what `train-prior
//! --dry-run` prints for configs too large to build), the committed configs parse as their kind
//! with the paper's shapes, and bad configs fail before any work, naming the key.
use std::path::Path;

use tch::{nn, Device};
use unclip_prior::config::NormType;
use unclip_prior::task::{PriorKind, PriorTrainConfig};
use unclip_prior::{ArPriorConfig, AutoregressivePrior, DiffusionPrior, PriorConfig};
use unclip_train::config::parse_config;

fn built(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

#[test]
fn parameter_counts_from_the_config_equal_the_built_models() {
    let small = PriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 2,
        embedding_dim: 12,
        num_embeddings: 5,
        ..PriorConfig::default()
    };
    let configs = [
        small.clone(),
        // Karlo's norms, and widths of their own for the timestep MLP and z_t.
        PriorConfig {
            norm_in_type: Some(NormType::Layer),
            embedding_proj_norm_type: Some(NormType::Layer),
            time_embed_dim: Some(24),
            embedding_proj_dim: Some(20),
            num_layers: 3,
            ..small.clone()
        },
        PriorConfig {
            num_embeddings: 9,
            num_attention_heads: 4,
            ..small
        },
    ];
    for cfg in configs {
        let vs = nn::VarStore::new(Device::Cpu);
        DiffusionPrior::new(vs.root(), &cfg).unwrap();
        assert_eq!(cfg.parameter_count(), built(&vs), "{cfg:?}");
    }
    let ar = ArPriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 2,
        text_layers: 0,
        text_width: None,
        embedding_dim: 12,
        num_embeddings: 5,
        components: 6,
        buckets: 32,
        range: 4.0,
        dot_buckets: 8,
        dot_quantile: None,
        temperature: 1.0,
    };
    for cfg in [
        ar.clone(),
        ArPriorConfig {
            text_layers: 2,
            text_width: Some(24),
            ..ar
        },
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        AutoregressivePrior::new(vs.root(), &cfg).unwrap();
        assert_eq!(cfg.parameter_count(), built(&vs), "{cfg:?}");
    }
}

#[test]
fn committed_configs_parse_as_their_kind() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (file, kind, params) in [
        ("configs/shapes/prior.yaml", PriorKind::Diffusion, 1e5..1e7),
        (
            "configs/shapes/prior-ar.yaml",
            PriorKind::Autoregressive,
            1e5..1e7,
        ),
        (
            "configs/paper/prior.yaml",
            PriorKind::Diffusion,
            1.2e9..1.25e9,
        ),
        (
            "configs/paper/prior-ar.yaml",
            PriorKind::Autoregressive,
            2.0e9..2.05e9,
        ),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let cfg = parse_config::<PriorTrainConfig>(&text, &[])
            .unwrap_or_else(|e| panic!("{file}: {e:#}"))
            .task;
        assert_eq!(cfg.prior.kind, kind, "{file}");
        let n = cfg.prior.parameter_count().unwrap() as f64;
        assert!(params.contains(&n), "{file}: {n} parameters");
        if let Some(ar) = &cfg.prior.autoregressive {
            // The paper's ratio: 319 of 1024 components.
            let ratio = ar.components as f64 / ar.embedding_dim as f64;
            assert!((ratio - 319.0 / 1024.0).abs() < 0.01, "{file}: {ratio}");
            assert_eq!(ar.buckets, 1024, "{file}");
        }
    }
}

const AR: &str = "
prior:
  kind: autoregressive
  autoregressive: {num_attention_heads: 2, attention_head_dim: 8, num_layers: 1, text_layers: 0,
    embedding_dim: 16, num_embeddings: 8, components: 4, buckets: 16, dot_buckets: 4}
clip: runs/clip
data: {train: a.tar, held_out: b.tar}
";

#[test]
fn bad_configs_fail_naming_the_key() {
    let parse = |text: &str, sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        parse_config::<PriorTrainConfig>(text, &sets)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    parse(AR, &[]).unwrap();
    for (sets, key) in [
        (vec!["prior.kind=diffusion"], "prior.model"),
        (vec!["prior.autoregressive.components=17"], "components"),
        (vec!["prior.autoregressive.dot_quantile=1.5"], "dot_quantile"),
        (vec!["prior.autoregressive.temperature=0"], "temperature"),
        (vec!["prior.autoregressive.dot_buckets=1"], "dot_buckets"),
        (vec!["prior.autoregressive.text_width=20"], "text_width"),
        (vec!["data.stats_samples=4"], "data.stats_samples"),
        (
            vec!["prior.gradient_checkpointing=true"],
            "prior.gradient_checkpointing",
        ),
        (
            vec!["prior.model={num_attention_heads: 2, attention_head_dim: 8, num_layers: 1, embedding_dim: 16, num_embeddings: 8}"],
            "prior.model",
        ),
    ] {
        let err = parse(AR, &sets).expect_err(&format!("{sets:?} should fail"));
        assert!(err.contains(key), "{sets:?}: {err}");
    }
    // The diffusion kind without its transformer, and with the other kind's section.
    let diffusion = AR.replace("kind: autoregressive", "kind: diffusion");
    let err = parse(&diffusion, &[]).unwrap_err();
    assert!(err.contains("prior.model"), "{err}");
    let mixed = format!("{diffusion}\n");
    let err = parse(
        &mixed,
        &["prior.model={num_attention_heads: 2, attention_head_dim: 8, num_layers: 1, embedding_dim: 16, num_embeddings: 8}"],
    )
    .unwrap_err();
    assert!(err.contains("prior.autoregressive"), "{err}");
}
