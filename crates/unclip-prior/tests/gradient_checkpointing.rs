//! `prior.gradient_checkpointing`: the diffusion prior's transformer with its blocks recomputed in
//! backward has the plain one's loss and gradients — dropout, the causal and padding masks
//! included (the autoregressive prior refuses the key: `tests/config.rs`).
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_prior::{DiffusionPrior, PriorConfig, TextCondition};
use unclip_testkit::{gradients, relative_max_diff};

fn run(checkpointing: bool) -> (f64, BTreeMap<String, Tensor>) {
    tch::manual_seed(5);
    let cfg = PriorConfig {
        num_attention_heads: 2,
        attention_head_dim: 8,
        num_layers: 3,
        embedding_dim: 12,
        num_embeddings: 5,
        dropout: 0.1,
        ..PriorConfig::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let mut prior = DiffusionPrior::new(vs.root(), &cfg).unwrap();
    prior.set_gradient_checkpointing(checkpointing);
    let f = (Kind::Float, Device::Cpu);
    let text = TextCondition {
        text_embeds: Tensor::randn([3, 12], f),
        tokens: Tensor::randn([3, 5, 12], f),
        // The last caption is two tokens long.
        mask: Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
            .view([3, 5])
            .to_kind(Kind::Bool),
    };
    let x_t = Tensor::randn([3, 12], f);
    let t = Tensor::from_slice(&[3i64, 400, 999]);
    tch::manual_seed(9); // dropout
    let loss = prior
        .forward_t(&x_t, &t, &text, true)
        .unwrap()
        .square()
        .mean(Kind::Float);
    loss.backward();
    let named = gradients(&vs);
    (loss.double_value(&[]), named)
}

#[test]
fn the_checkpointed_prior_has_the_plain_gradients() {
    let runs = unclip_diffusion::nn::checkpoint::block_runs;
    let start = runs();
    let (loss, plain) = run(false);
    assert_eq!(runs(), start, "no block checkpointed");
    let (loss_ckpt, ckpt) = run(true);
    assert_eq!(
        runs() - start,
        2 * 3,
        "three blocks, each run and recomputed"
    );
    assert_eq!(loss, loss_ckpt);
    assert!(plain.len() > 20);
    for (name, g) in &plain {
        let c = &ckpt[name];
        assert!(g.defined() && c.defined(), "{name}");
        let diff = relative_max_diff(g, c);
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
}
