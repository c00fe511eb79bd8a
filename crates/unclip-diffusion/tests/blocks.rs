//! Shared neural blocks against diffusers (`ResnetBlock2D`, `Upsample2D`, `Downsample2D`,
//! `get_timestep_embedding`) and written-out PyTorch references (attention with masks, pre-LN
//! transformer block, slerp). Weights load by module path, so names must match the state dicts.
mod common;

use common::*;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};
use unclip_diffusion::nn::{
    timestep_embedding, upsample_conv3x3, upsample_nearest, AttentionMask, Downsample, KvCache,
    MultiHeadAttention, ResBlock, ResBlockConfig, Resample, TransformerBlock, Upsample,
};
use unclip_diffusion::{l2_normalize, slerp};

/// Copies `prefix`-named fixture weights into `vs`, requiring the two name sets to be equal.
fn load(vs: &mut nn::VarStore, f: &HashMap<String, Tensor>, prefix: &str) {
    vs.double();
    let wanted: Vec<String> = f
        .keys()
        .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
        .collect::<Vec<_>>();
    let mut ours: Vec<String> = vs.variables().keys().cloned().collect();
    let mut theirs = wanted.clone();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "parameter names under {prefix}");
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(get(f, &format!("{prefix}{name}")));
        }
    });
}

#[test]
fn timestep_embedding_matches_diffusers() {
    let f = fixtures("blocks.safetensors");
    let t = get(&f, "temb/t");
    for dim in [32i64, 33, 320] {
        let ours = timestep_embedding(t, dim, 10_000.0).unwrap();
        // diffusers works in f32 (phase error ~1e-4 at t ≈ 1000); the f64 formula is exact.
        assert_close(
            &ours,
            get(&f, &format!("temb/{dim}")),
            2e-4,
            0.0,
            &format!("temb {dim} vs diffusers"),
        );
        assert_close(
            &ours,
            get(&f, &format!("temb64/{dim}")),
            1e-7,
            0.0,
            &format!("temb {dim} vs f64"),
        );
    }
    let int_t = Tensor::from_slice(&[0i64, 17, 999]);
    assert_eq!(
        timestep_embedding(&int_t, 8, 10_000.0).unwrap().size(),
        [3, 8]
    );
    assert!(timestep_embedding(&int_t.view([3, 1]), 8, 10_000.0).is_err());
}

#[test]
fn resblock_matches_diffusers_resnet_block() {
    let f = fixtures("blocks.safetensors");
    for (name, cin, cout, resample) in [
        ("same", 32, 32, Resample::None),
        ("wider", 32, 64, Resample::None),
        ("up", 32, 32, Resample::Up),
        ("down", 64, 32, Resample::Down),
    ] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let cfg = ResBlockConfig {
            resample,
            ..ResBlockConfig::new(cin, cout, 48)
        };
        let block = ResBlock::new(vs.root(), &cfg);
        load(&mut vs, &f, &format!("resblock/{name}/w/"));
        let x = get(&f, &format!("resblock/{name}/x"));
        let emb = get(&f, &format!("resblock/{name}/emb"));
        let y = block.forward_t(x, Some(emb), false);
        assert_close(
            &y,
            get(&f, &format!("resblock/{name}/y")),
            1e-10,
            1e-10,
            &format!("resblock {name}"),
        );
    }
}

#[test]
fn the_sub_pixel_upsampling_convolution_is_the_convolution_of_the_upsampled_map() {
    // The ResBlocks' and Upsample's fast path against its definition, conv(upsample(x)): values
    // and the gradients of x, the weight and the bias, in float64 at odd, non-square sizes (the
    // diffusers fixtures above cover the blocks at one square size, forward only).
    for (bias, size) in [(true, [2, 5, 3, 4]), (false, [1, 3, 5, 2])] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let conv = nn::conv2d(
            vs.root(),
            size[1],
            4,
            3,
            nn::ConvConfig {
                padding: 1,
                bias,
                ..Default::default()
            },
        );
        vs.double();
        let x = Tensor::randn(size, (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let want = tch::nn::Module::forward(&conv, &upsample_nearest(&x));
        let got = upsample_conv3x3(&x, &conv);
        assert_eq!(got.size(), [size[0], 4, 2 * size[2], 2 * size[3]]);
        assert_close(&got, &want, 1e-12, 1e-12, "sub-pixel convolution");
        let g = want.randn_like();
        let mut inputs = vec![x.shallow_clone(), conv.ws.shallow_clone()];
        inputs.extend(conv.bs.iter().map(Tensor::shallow_clone));
        let grads =
            |y: &Tensor| Tensor::run_backward(&[(y * &g).sum(Kind::Double)], &inputs, false, false);
        for (i, (a, b)) in grads(&got).iter().zip(grads(&want).iter()).enumerate() {
            assert_close(a, b, 1e-12, 1e-12, &format!("gradient of input {i}"));
        }
    }
}

#[test]
fn fresh_blocks_start_as_pytorch_initialises_them() {
    // diffusers' modules keep PyTorch's nn.Linear / nn.Conv2d defaults: weights and biases uniform
    // in ±1/√fan_in. tch's defaults (√6× wider weights, zero conv biases) or ADM's zero-initialised
    // last conv fail here.
    let vs = nn::VarStore::new(Device::Cpu);
    let _block = ResBlock::new(vs.root(), &ResBlockConfig::new(32, 64, 16));
    let _down = Downsample::new(vs.root() / "down", 64, 64, true);
    // conv1, time_emb_proj, conv2, conv_shortcut and the downsampling conv.
    assert_eq!(unclip_testkit::assert_pytorch_default_init(&vs), 5);
}

#[test]
fn up_and_downsampling_match_diffusers() {
    let f = fixtures("blocks.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let up = Upsample::new(vs.root(), 16, 8, true);
    load(&mut vs, &f, "upsample/w/");
    assert_close(
        &up.forward(get(&f, "upsample/x")),
        get(&f, "upsample/y"),
        1e-10,
        1e-10,
        "upsample",
    );
    let mut vs = nn::VarStore::new(Device::Cpu);
    let down = Downsample::new(vs.root(), 16, 8, true);
    load(&mut vs, &f, "downsample/w/");
    assert_close(
        &down.forward(get(&f, "downsample/x")),
        get(&f, "downsample/y"),
        1e-10,
        1e-10,
        "downsample",
    );
}

#[test]
fn attention_matches_reference_with_masks() {
    let f = fixtures("blocks.safetensors");
    for (name, ctx_dim, causal, pad) in [
        ("self", 16, false, false),
        ("causal", 16, true, false),
        ("causal_pad", 16, true, true),
        ("cross_pad", 12, false, true),
    ] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let attn = MultiHeadAttention::new(vs.root(), 16, ctx_dim, 4).unwrap();
        load(&mut vs, &f, &format!("attn/{name}/w/"));
        let x = get(&f, &format!("attn/{name}/x"));
        let ctx = get(&f, &format!("attn/{name}/ctx"));
        let kp = get(&f, &format!("attn/{name}/key_padding")).to_kind(Kind::Bool);
        let context = (ctx_dim != 16).then_some(ctx);
        let mask = AttentionMask {
            causal,
            key_padding: pad.then_some(&kp),
        };
        let y = attn.forward(x, context, mask).unwrap();
        assert_close(
            &y,
            get(&f, &format!("attn/{name}/y")),
            1e-10,
            1e-10,
            &format!("attention {name}"),
        );
    }
    let vs = nn::VarStore::new(Device::Cpu);
    assert!(
        MultiHeadAttention::new(vs.root(), 10, 10, 4).is_err(),
        "width not divisible by heads"
    );
    let attn = MultiHeadAttention::new(vs.root() / "a", 8, 8, 2).unwrap();
    let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
    let bad_kp = Tensor::ones([2, 4], (Kind::Bool, Device::Cpu));
    let err = attn
        .forward(
            &x,
            None,
            AttentionMask {
                causal: false,
                key_padding: Some(&bad_kp),
            },
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("expected [2, 3], got [2, 4]"),
        "{err}"
    );
    let ctx = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
    assert!(attn
        .forward(
            &x,
            Some(&ctx),
            AttentionMask {
                causal: true,
                key_padding: None
            }
        )
        .is_err());
    assert!(attn
        .forward(&x.view([6, 8]), None, AttentionMask::default())
        .is_err());
}

#[test]
fn transformer_block_matches_reference() {
    let f = fixtures("blocks.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let block = TransformerBlock::new(vs.root(), 16, 4, 4).unwrap();
    load(&mut vs, &f, "transformer/w/");
    let y = block
        .forward(
            get(&f, "transformer/x"),
            AttentionMask {
                causal: true,
                key_padding: None,
            },
        )
        .unwrap();
    assert_close(
        &y,
        get(&f, "transformer/y"),
        1e-10,
        1e-10,
        "transformer block",
    );
}

/// Decoding in chunks through the KV cache (a padded prefix, then one token at a time) gives the
/// full causal forward's outputs, padding included; a cache of other rows is refused.
#[test]
fn transformer_block_cached_chunks_equal_the_full_causal_forward() {
    let f = fixtures("blocks.safetensors");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let block = TransformerBlock::new(vs.root(), 16, 4, 4).unwrap();
    load(&mut vs, &f, "transformer/w/");
    tch::manual_seed(3);
    let (b, len, prefix) = (3i64, 9i64, 5i64);
    let x = Tensor::randn([b, len, 16], (Kind::Double, Device::Cpu));
    // Row 1 has two padded prefix tokens, row 2 one; the first token is always real.
    let padding = Tensor::ones([b, len], (Kind::Bool, Device::Cpu));
    let _ = padding.narrow(1, 3, 2).select(0, 1).fill_(0);
    let _ = padding.narrow(1, 4, 1).select(0, 2).fill_(0);
    let full = block
        .forward(
            &x,
            AttentionMask {
                causal: true,
                key_padding: Some(&padding),
            },
        )
        .unwrap();
    let mut cache = KvCache::new();
    let mut chunks = vec![block
        .forward_cached(
            &x.narrow(1, 0, prefix),
            &mut cache,
            Some(&padding.narrow(1, 0, prefix)),
        )
        .unwrap()];
    for i in prefix..len {
        chunks.push(
            block
                .forward_cached(&x.narrow(1, i, 1), &mut cache, None)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), len);
    let cached = Tensor::cat(&chunks, 1);
    assert_close(&cached, &full, 1e-10, 1e-10, "cached decoding");
    // Without the padding the outputs differ: the mask is honoured, not ignored.
    let unmasked = block
        .forward(
            &x,
            AttentionMask {
                causal: true,
                key_padding: None,
            },
        )
        .unwrap();
    assert!((unmasked - &full).abs().max().double_value(&[]) > 1e-3);
    assert!(block
        .forward_cached(&x.narrow(0, 0, 2).narrow(1, 0, 1), &mut cache, None)
        .is_err());
}

#[test]
fn slerp_matches_reference_and_keeps_unit_norm() {
    let f = fixtures("blocks.safetensors");
    let (a, b, theta) = (
        get(&f, "slerp/a"),
        get(&f, "slerp/b"),
        get(&f, "slerp/theta"),
    );
    let y = slerp(a, b, theta).unwrap();
    assert_close(&y, get(&f, "slerp/y"), 1e-12, 1e-12, "slerp");
    let norms = y.norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    assert_close(&norms, &norms.ones_like(), 1e-12, 0.0, "unit norm");
    // Endpoints, a scalar θ, scaled inputs (norms interpolate) and parallel inputs.
    assert_close(
        &slerp(a, b, &Tensor::from(0.0f64)).unwrap(),
        a,
        1e-12,
        0.0,
        "θ = 0",
    );
    assert_close(
        &slerp(a, b, &Tensor::from(1.0f64)).unwrap(),
        b,
        1e-12,
        0.0,
        "θ = 1",
    );
    let half = slerp(&(a * 2.0), &(b * 4.0), &Tensor::from(0.5f64)).unwrap();
    let want = slerp(a, b, &Tensor::from(0.5f64)).unwrap() * 3.0;
    assert_close(&half, &want, 1e-12, 1e-12, "norms interpolate linearly");
    assert_close(
        &slerp(a, a, &Tensor::from(0.3f64)).unwrap(),
        a,
        1e-12,
        0.0,
        "parallel",
    );
    assert!(slerp(a, &b.narrow(1, 0, 4), theta).is_err());
    assert!(slerp(a, b, &Tensor::from_slice(&[0.5f64, 0.5])).is_err());
    let n = l2_normalize(&(a * 7.0)).unwrap();
    assert_close(&n, a, 1e-12, 1e-12, "l2_normalize");
}
