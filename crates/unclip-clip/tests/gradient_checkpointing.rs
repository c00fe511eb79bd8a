//! `gradient_checkpointing` in a CLIP training config: the text tower's and the ViT's layers
//! recomputed in backward give the plain loss and gradients, every layer running twice.
mod common;

use common::tiny_vit;
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::Clip;
use unclip_diffusion::nn::checkpoint::block_runs;
use unclip_testkit::{gradients, relative_max_diff};

/// The contrastive loss of a batch and every parameter's gradient.
fn run(checkpointing: bool) -> (f64, BTreeMap<String, Tensor>) {
    tch::manual_seed(2);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut clip = Clip::new(vs.root(), &tiny_vit(64, 96)).unwrap();
    clip.set_gradient_checkpointing(checkpointing);
    let pixels = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint(999, [4, 16], (Kind::Int64, Device::Cpu));
    let img = clip.encode_image(&pixels).unwrap();
    let txt = clip.encode_text(&ids).unwrap().embeds;
    let logits = img.matmul(&txt.tr());
    let labels = Tensor::arange(4, (Kind::Int64, Device::Cpu));
    let loss = logits.cross_entropy_for_logits(&labels);
    loss.backward();
    let grads = gradients(&vs);
    (loss.double_value(&[]), grads)
}

#[test]
fn checkpointed_towers_have_the_plain_gradients() {
    let start = block_runs();
    let (loss, plain) = run(false);
    assert_eq!(block_runs(), start);
    let (loss_ckpt, ckpt) = run(true);
    assert_eq!(
        block_runs() - start,
        2 * (2 + 2),
        "each layer run and recomputed"
    );
    assert_eq!(loss, loss_ckpt);
    for (name, g) in &plain {
        if !g.defined() {
            continue; // logit_scale: not in this loss
        }
        let c = &ckpt[name];
        let diff = relative_max_diff(g, c);
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
}
