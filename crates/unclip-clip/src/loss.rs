//! CLIP's symmetric contrastive loss (InfoNCE both ways over the batch's similarity matrix), over
//! the global batch in data-parallel runs, optionally with NegCLIP's hard-negative captions.

use anyhow::Result;
use tch::{Kind, Reduction, Tensor};
use unclip_diffusion::embedding::l2_normalize;
use unclip_dist::ProcessGroup;

#[derive(Debug)]
pub struct ContrastiveOutput {
    pub loss: Tensor,
    /// [B_global, B_global] image→text logits.
    pub logits_per_image: Tensor,
    /// The matching column of each row.
    pub labels: Tensor,
}

/// Every rank's rows of `x` in rank order; this rank's own rows keep their graph.
///
/// The gathered copies carry no gradient, so each rank back-propagates only through its own
/// features. Every rank computes the same global loss L; the runtime then *averages* gradients,
/// which would give ∂L/∂θ / world_size. Scaling the local rows' gradient by world_size (value
/// unchanged) makes the averaged gradient exactly ∂L/∂θ, as if one process held the whole batch.
fn gather_rows(pg: &ProcessGroup, x: &Tensor) -> Result<Tensor> {
    let world = pg.world_size() as f64;
    let gathered = pg.all_gather(&x.detach())?;
    let local = x * world - (x * (world - 1.0)).detach();
    let mut parts: Vec<Tensor> = (0..pg.world_size() as i64)
        .map(|r| gathered.get(r))
        .collect();
    parts[pg.rank()] = local;
    Ok(Tensor::cat(&parts, 0))
}

/// (CE(image→text) + CE(text→image)) / 2 over normalised embeddings scaled by `logit_scale`.
/// With a group, the loss is over every rank's batch (all ranks must use the same batch size).
pub fn contrastive_loss(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    logit_scale: &Tensor,
    group: Option<&ProcessGroup>,
) -> Result<ContrastiveOutput> {
    loss_over(image_embeds, text_embeds, None, logit_scale, group)
}

/// A batch's hard-negative captions (NegCLIP): row i's embedding is image i's caption with one word
/// swapped ([`unclip_data::word_swap`]); `valid` [B] is false where a caption had no word to swap.
#[derive(Debug)]
pub struct HardNegatives<'a> {
    pub text_embeds: &'a Tensor,
    pub valid: &'a Tensor,
}

/// The contrastive loss with each image's hard-negative caption as an extra image→text candidate
/// (NegCLIP, Yuksekgonul et al. 2023): the image→text softmax runs over the global batch's captions
/// and its valid negatives, text→image as in [`contrastive_loss`].
pub fn contrastive_loss_with_negatives(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    negatives: &HardNegatives,
    logit_scale: &Tensor,
    group: Option<&ProcessGroup>,
) -> Result<ContrastiveOutput> {
    loss_over(
        image_embeds,
        text_embeds,
        Some(negatives),
        logit_scale,
        group,
    )
}

fn loss_over(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    negatives: Option<&HardNegatives>,
    logit_scale: &Tensor,
    group: Option<&ProcessGroup>,
) -> Result<ContrastiveOutput> {
    let img = l2_normalize(image_embeds)?;
    let txt = l2_normalize(text_embeds)?;
    let neg = negatives
        .map(|n| -> Result<(Tensor, Tensor)> {
            Ok((l2_normalize(n.text_embeds)?, n.valid.to_kind(Kind::Float)))
        })
        .transpose()?;
    let (all_img, all_txt, neg) = match group {
        Some(pg) if pg.world_size() > 1 => (
            gather_rows(pg, &img)?,
            gather_rows(pg, &txt)?,
            neg.map(|(embeds, valid)| -> Result<(Tensor, Tensor)> {
                Ok((
                    gather_rows(pg, &embeds)?,
                    pg.all_gather(&valid)?.flatten(0, 1),
                ))
            })
            .transpose()?,
        ),
        _ => (img, txt, neg),
    };
    // Every rank evaluates the whole global loss (see `gather_rows` for why this is exact).
    let logits_per_image = logit_scale * all_img.matmul(&all_txt.tr());
    let logits_per_text = logits_per_image.tr();
    let n = logits_per_image.size()[0];
    let labels = Tensor::arange(n, (Kind::Int64, logits_per_image.device()));
    let ce = |logits: &Tensor| {
        logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels,
            None,
            Reduction::Mean,
            -100,
            0.0,
        )
    };
    let image_to_text = match &neg {
        None => ce(&logits_per_image),
        Some((embeds, valid)) => {
            // A caption with nothing to swap has no negative: its column drops out of the softmax.
            let neg_logits = (logit_scale * all_img.matmul(&embeds.tr()))
                .to_kind(Kind::Float)
                .masked_fill(&valid.eq(0.0).unsqueeze(0), f64::NEG_INFINITY);
            ce(&Tensor::cat(
                &[logits_per_image.to_kind(Kind::Float), neg_logits],
                1,
            ))
        }
    };
    let loss = (image_to_text + ce(&logits_per_text)) / 2.0;
    Ok(ContrastiveOutput {
        loss,
        logits_per_image,
        labels,
    })
}

/// The fraction of images, among those with a valid negative, whose caption is closer to them
/// than its hard negative; `None` when no caption had a word to swap.
pub fn hard_negative_accuracy(
    image_embeds: &Tensor,
    text_embeds: &Tensor,
    negatives: &HardNegatives,
) -> Result<Option<f64>> {
    let img = l2_normalize(image_embeds)?;
    let right = (&img * l2_normalize(text_embeds)?).sum_dim_intlist(-1, false, Kind::Float);
    let wrong =
        (&img * l2_normalize(negatives.text_embeds)?).sum_dim_intlist(-1, false, Kind::Float);
    let valid = negatives.valid.to_kind(Kind::Bool);
    let count = valid.sum(Kind::Int64).int64_value(&[]);
    if count == 0 {
        return Ok(None);
    }
    let wins = right.gt_tensor(&wrong).logical_and(&valid);
    Ok(Some(
        wins.sum(Kind::Int64).int64_value(&[]) as f64 / count as f64,
    ))
}

/// Top-1 retrieval accuracy both ways among a batch's pairs: (image→text, text→image).
pub fn retrieval_top1(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<(f64, f64)> {
    let sim = l2_normalize(image_embeds)?.matmul(&l2_normalize(text_embeds)?.tr());
    let n = sim.size()[0];
    let target = Tensor::arange(n, (Kind::Int64, sim.device()));
    let acc = |pred: Tensor| {
        pred.eq_tensor(&target)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    Ok((acc(sim.argmax(1, false)), acc(sim.argmax(0, false))))
}
