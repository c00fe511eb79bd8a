//! Gradient checkpointing of the UNet (`decoder.gradient_checkpointing`): the same loss and the
//! same gradients as without it — dropout, the attention's padding mask, the upsamplers'
//! attention-free UNet and bf16 autocast included.
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_decoder::{UNet, UNetConfig};
use unclip_testkit::{gradients, relative_max_diff};
use unclip_train::precision::{autocast, Precision};

fn tiny(dropout: f64, attention: bool) -> UNetConfig {
    let (down, up) = if attention {
        ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D")
    } else {
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
    };
    UNetConfig {
        in_channels: 3,
        out_channels: 6,
        block_out_channels: vec![16, 32],
        down_block_types: vec!["ResnetDownsampleBlock2D".into(), down.into()],
        up_block_types: vec![up.into(), "ResnetUpsampleBlock2D".into()],
        layers_per_block: 2,
        cross_attention_dim: 24,
        attention_head_dim: 8,
        norm_num_groups: 4,
        norm_eps: 1e-5,
        dropout,
        time_scale_shift: Default::default(),
    }
}

/// The loss and every parameter's gradient (by name) after one backward pass.
fn run(
    cfg: &UNetConfig,
    attention: bool,
    checkpointing: bool,
    precision: Precision,
) -> (f64, BTreeMap<String, Tensor>) {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let mut unet = if attention {
        UNet::new(vs.root(), cfg).unwrap()
    } else {
        UNet::attention_free(vs.root(), cfg).unwrap()
    };
    unet.set_gradient_checkpointing(checkpointing);
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[10i64, 700]);
    let class = Tensor::randn([2, 64], (Kind::Float, Device::Cpu));
    let context = Tensor::randn([2, 5, 24], (Kind::Float, Device::Cpu));
    // The second sample's last two context tokens are padding.
    let mask = Tensor::from_slice(&[true, true, true, true, true, true, true, true, false, false])
        .view([2, 5]);
    tch::manual_seed(11); // dropout
    let loss = {
        let _autocast = autocast(Device::Cpu, precision);
        let out = if attention {
            unet.forward_t(&x, &t, &class, &context, Some(&mask), true)
                .unwrap()
        } else {
            unet.forward_unconditional(&x, &t, true).unwrap()
        };
        out.to_kind(Kind::Float).square().mean(Kind::Float)
    };
    loss.backward();
    let grads = gradients(&vs);
    (loss.double_value(&[]), grads)
}

/// The tests draw from libtorch's one CPU generator (seeded per run, and set back in backward
/// to replay dropout), so they take turns.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Checkpointed against plain: the same loss, and every gradient within `worst` of the plain
/// one (relative to its largest entry), the median parameter's within `median`.
fn assert_same(cfg: &UNetConfig, attention: bool, precision: Precision, median: f64, worst: f64) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let runs = unclip_diffusion::nn::checkpoint::block_runs;
    let start = runs();
    let (loss, plain) = run(cfg, attention, false, precision);
    assert_eq!(runs(), start, "no block checkpointed");
    let (loss_ckpt, ckpt) = run(cfg, attention, true, precision);
    // Each ResBlock — down: 2 + a downsampler, 2; the middle's 2; up: 3 + an upsampler, 3 — and
    // each attention block (2 down, 1 in the middle, 3 up), run and recomputed.
    let resnets = (2 + 1) + 2 + 2 + (3 + 1) + 3;
    let attentions = if attention { 2 + 1 + 3 } else { 0 };
    assert_eq!(runs() - start, 2 * (resnets + attentions));
    assert_eq!(loss, loss_ckpt, "the forward pass is the same");
    assert_eq!(plain.len(), ckpt.len());
    let mut diffs = Vec::new();
    for (name, g) in &plain {
        let c = &ckpt[name];
        assert!(
            g.defined() && c.defined(),
            "{name}: a gradient went missing"
        );
        let diff = relative_max_diff(g, c);
        assert!(diff <= worst, "{name}: relative difference {diff}");
        diffs.push(diff);
    }
    diffs.sort_by(f64::total_cmp);
    let mid = diffs[diffs.len() / 2];
    assert!(mid <= median, "median relative difference {mid}");
}

#[test]
fn the_decoder_unet_checkpointed_has_the_plain_gradients() {
    assert_same(&tiny(0.1, true), true, Precision::Fp32, 1e-6, 1e-5);
}

#[test]
fn the_upsampler_unet_checkpointed_has_the_plain_gradients() {
    assert_same(&tiny(0.1, false), false, Precision::Fp32, 1e-6, 1e-5);
}

#[test]
fn under_bf16_autocast_the_recomputation_casts_as_the_forward_did() {
    // Recomputed outside the forward's autocast region, the blocks would mix bf16 activations
    // with fp32 weights and fail. Replayed, most gradients are bit for bit the plain ones (bf16
    // against fp32 differs by ~1.5 % at the median); a few differ by bf16's rounding of sums
    // accumulated in another order (~2 % at most here).
    assert_same(&tiny(0.0, true), true, Precision::Bf16, 1e-3, 0.05);
}
