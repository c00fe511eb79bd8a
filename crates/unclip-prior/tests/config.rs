//! The prior's size counted from its config equals the built model's (what `train-prior
//! --dry-run` prints for configs too large to build).
use tch::{nn, Device};
use unclip_prior::config::NormType;
use unclip_prior::{DiffusionPrior, PriorConfig};

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
        let built: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(cfg.parameter_count(), built, "{cfg:?}");
    }
}
