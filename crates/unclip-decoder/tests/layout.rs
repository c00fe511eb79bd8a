//! The UNet keeps standard (NCHW-contiguous) feature maps. The attention block's output comes out
//! of a [B, HW, C] projection; left as a transposed view it is channels-last, and the residual
//! sum spreads that layout to every later layer, whose CPU GroupNorm kernels are then the
//! channels-last ones — measured 10–15 % of a training step (README, decoder benchmark).
use tch::{nn, Device, Kind, Tensor};
use unclip_clip::caption::TextCondition;
use unclip_decoder::{AddedKvAttention, DecoderCondition, DecoderModelConfig, UnclipDecoder};

#[test]
fn feature_maps_stay_contiguous_through_attention() {
    tch::manual_seed(0);
    let cfg: DecoderModelConfig = serde_yaml::from_str(
        "clip_embeddings_dim: 16
unet: {block_out_channels: [8, 16], down_block_types: [SimpleCrossAttnDownBlock2D, SimpleCrossAttnDownBlock2D],
       up_block_types: [SimpleCrossAttnUpBlock2D, SimpleCrossAttnUpBlock2D], layers_per_block: 1,
       cross_attention_dim: 16, attention_head_dim: 8, norm_num_groups: 4}",
    )
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = UnclipDecoder::from_config(vs.root(), &cfg).unwrap();
    let b = 2;
    let cond = DecoderCondition {
        image_embeds: Tensor::randn([b, 16], (Kind::Float, Device::Cpu)),
        text: TextCondition {
            text_embeds: Tensor::randn([b, 16], (Kind::Float, Device::Cpu)),
            tokens: Tensor::randn([b, 5, 16], (Kind::Float, Device::Cpu)),
            mask: Tensor::ones([b, 5], (Kind::Bool, Device::Cpu)),
        },
    };
    let x = Tensor::randn([b, 3, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[3i64, 700]);
    let out = model.forward_t(&x, &t, &cond, true).unwrap();
    assert_eq!(out.size(), [b, 6, 8, 8]);
    // Attention at every level: the last layers run on an attention block's output.
    assert!(
        out.is_contiguous(),
        "UNet output strides {:?}: a channels-last layout leaked from the attention block",
        out.stride()
    );
    let attention = AddedKvAttention::new(vs.root() / "probe", 8, 2, 4, 16, 4).unwrap();
    let feature_map = Tensor::randn([b, 8, 4, 4], (Kind::Float, Device::Cpu));
    let attended = attention
        .forward(&feature_map, &cond.text.tokens, Some(&cond.text.mask))
        .unwrap();
    assert!(attended.is_contiguous(), "{:?}", attended.stride());
    // And the gradients reach the input-side weights through the attention path.
    out.sum(Kind::Float).backward();
    let grad = vs
        .variables()
        .into_iter()
        .find(|(n, _)| n == "decoder.conv_in.weight")
        .map(|(_, v)| v.grad())
        .unwrap();
    assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}
