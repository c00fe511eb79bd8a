//! PyTorch's default initialisation of `nn.Linear` and `nn.Conv2d`, which diffusers' modules keep:
//! weights and biases uniform in ±1/√fan_in (`kaiming_uniform_` with a = √5). tch's defaults
//! differ — weights √6 times wider (Kaiming with the ReLU gain) and zero conv biases — and the
//! shapes decoder trained measurably slower from them than diffusers did (docs/decoder-shapes.md).

use tch::nn;

fn uniform(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.Linear(in_dim, out_dim)` as PyTorch initialises it.
pub fn linear(p: nn::Path, in_dim: i64, out_dim: i64) -> nn::Linear {
    let init = uniform(in_dim);
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias: true,
        },
    )
}

/// `nn.Conv2d(in_channels, out_channels, kernel, stride, padding)` as PyTorch initialises it;
/// `cfg` gives stride, padding and groups (its initialisers are replaced).
pub fn conv2d(
    p: nn::Path,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    cfg: nn::ConvConfig,
) -> nn::Conv2D {
    let init = uniform(in_channels / cfg.groups.max(1) * kernel * kernel);
    nn::conv2d(
        p,
        in_channels,
        out_channels,
        kernel,
        nn::ConvConfig {
            ws_init: init,
            bs_init: init,
            ..cfg
        },
    )
}
