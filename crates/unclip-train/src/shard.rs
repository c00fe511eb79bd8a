//! ZeRO stage 1 (Rajbhandari et al. 2020), as PyTorch's `ZeroRedundancyOptimizer` does it: each
//! variable is owned by one rank, which alone keeps its AdamW moments and EMA weights and updates
//! it; after each step the owners broadcast their variables. Gradients are all-reduced in full —
//! or, with ZeRO stage 2, reduced to each variable's owner alone ([`crate::distributed`]) — so the
//! updates are the unsharded run's, bit for bit. Checkpoints are gathered to rank 0 in the
//! unsharded format: any run resumes any checkpoint, whatever its world size or sharding.

use anyhow::{Context, Result};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use unclip_dist::ProcessGroup;

/// One variable's place in the partition.
#[derive(Debug, Clone)]
struct Owned {
    name: String,
    shape: Vec<i64>,
    kind: Kind,
    trainable: bool,
    owner: usize,
}

/// A tensor to move between ranks: its key in the state it belongs to, and its owner.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    shape: Vec<i64>,
    kind: Kind,
    owner: usize,
}

/// Which rank owns each variable.
#[derive(Debug, Clone)]
pub struct Shards {
    vars: Vec<Owned>,
    /// Each variable's owner by name (looked up once per variable at start-up: a scan of `vars`
    /// would make that quadratic in the number of variables).
    owner_of: HashMap<String, usize>,
    rank: usize,
    world: usize,
}

/// Owners for tensors of `sizes` elements: largest first, each to the least-loaded rank (the
/// lowest on a tie), as PyTorch's ZeroRedundancyOptimizer partitions. Deterministic, so every
/// rank computes the same partition.
pub fn partition(sizes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owners = vec![0usize; sizes.len()];
    for i in order {
        let rank = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        owners[i] = rank;
        load[rank] += sizes[i];
    }
    owners
}

impl Shards {
    /// The partition of `vars` (every variable, in the name order every rank shares) over `world`
    /// ranks, seen from `rank`.
    pub fn new(vars: &[(String, Tensor)], rank: usize, world: usize) -> Self {
        let sizes: Vec<usize> = vars.iter().map(|(_, t)| t.numel()).collect();
        let owners = partition(&sizes, world);
        let vars: Vec<Owned> = vars
            .iter()
            .zip(owners)
            .map(|((name, t), owner)| Owned {
                name: name.clone(),
                shape: t.size(),
                kind: t.kind(),
                trainable: t.requires_grad(),
                owner,
            })
            .collect();
        let owner_of = vars.iter().map(|v| (v.name.clone(), v.owner)).collect();
        Self {
            vars,
            owner_of,
            rank,
            world,
        }
    }

    /// Whether this rank owns variable `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.owner(name) == Some(self.rank)
    }

    /// The rank that owns variable `name`.
    pub fn owner(&self, name: &str) -> Option<usize> {
        self.owner_of.get(name).copied()
    }

    /// (elements this rank owns, elements in all) over the trainable variables.
    pub fn owned_numel(&self) -> (usize, usize) {
        let numel = |v: &Owned| v.shape.iter().product::<i64>() as usize;
        let trainable = self.vars.iter().filter(|v| v.trainable);
        let all = trainable.clone().map(numel).sum();
        let own = trainable.filter(|v| v.owner == self.rank).map(numel).sum();
        (own, all)
    }

    fn entries(&self, trainable_only: bool, prefixes: &[&str]) -> Vec<Entry> {
        let mut out = Vec::new();
        for v in self.vars.iter().filter(|v| v.trainable || !trainable_only) {
            for prefix in prefixes {
                out.push(Entry {
                    key: format!("{prefix}{}", v.name),
                    shape: v.shape.clone(),
                    kind: v.kind,
                    owner: v.owner,
                });
            }
        }
        out
    }

    /// After the owners' updates, every rank takes each trainable variable's values from its
    /// owner (the others never change, and stay as rank 0 broadcast them at the start).
    pub fn broadcast_from_owners(
        &self,
        pg: &ProcessGroup,
        vars: &[(String, Tensor)],
        bucket_bytes: usize,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let by_name: HashMap<&str, &Tensor> = vars.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let rank = self.rank;
        exchange(
            pg,
            &self.entries(true, &[""]),
            &by_name,
            bucket_bytes,
            |entry, values| {
                if entry.owner != rank {
                    by_name[entry.key.as_str()]
                        .shallow_clone()
                        .copy_(&values.view(entry.shape.as_slice()));
                }
            },
        )
        .context("broadcasting the updated variables from their owners")
    }

    /// Rank 0 receives the whole EMA (every variable; `local` holds this rank's shadows by
    /// name): its own share as it holds it, the other ranks' on the CPU; None on other ranks.
    pub fn gather_ema(
        &self,
        pg: &ProcessGroup,
        local: &[(String, Tensor)],
        bucket_bytes: usize,
    ) -> Result<Option<Vec<(String, Tensor)>>> {
        self.gather(pg, &self.entries(false, &[""]), local, bucket_bytes)
            .context("gathering the EMA weights to rank 0")
    }

    /// Rank 0 receives the whole optimiser state (`exp_avg.NAME`, `exp_avg_sq.NAME` of every
    /// trainable variable, as [`crate::optim::AdamW::state_tensors`] names them): its own share
    /// as it holds it, the other ranks' on the CPU; None on other ranks.
    pub fn gather_optimizer_state(
        &self,
        pg: &ProcessGroup,
        local: &[(String, Tensor)],
        bucket_bytes: usize,
    ) -> Result<Option<Vec<(String, Tensor)>>> {
        let entries = self.entries(true, &["exp_avg.", "exp_avg_sq."]);
        self.gather(pg, &entries, local, bucket_bytes)
            .context("gathering the optimizer state to rank 0")
    }

    fn gather(
        &self,
        pg: &ProcessGroup,
        entries: &[Entry],
        local: &[(String, Tensor)],
        bucket_bytes: usize,
    ) -> Result<Option<Vec<(String, Tensor)>>> {
        let _guard = tch::no_grad_guard();
        let by_key: HashMap<&str, &Tensor> = local.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let keep = self.rank == 0;
        // Rank 0's own share needs no collective (nor a copy); the others' come to it.
        let mut out: HashMap<String, Tensor> = HashMap::new();
        if keep {
            for e in entries.iter().filter(|e| e.owner == 0) {
                let t = by_key
                    .get(e.key.as_str())
                    .with_context(|| format!("rank 0 owns `{}` but lacks it", e.key))?;
                out.insert(e.key.clone(), t.shallow_clone());
            }
        }
        let others: Vec<Entry> = entries.iter().filter(|e| e.owner != 0).cloned().collect();
        exchange(pg, &others, &by_key, bucket_bytes, |entry, values| {
            if keep {
                // A copy of its own, not a view that keeps the whole bucket alive.
                let t = values.view(entry.shape.as_slice());
                let t = match t.device() {
                    Device::Cpu => t.copy(),
                    _ => t.to_device(Device::Cpu),
                };
                out.insert(entry.key.clone(), t);
            }
        })?;
        if !keep {
            return Ok(None);
        }
        Ok(Some(
            entries
                .iter()
                .filter_map(|e| out.remove(&e.key).map(|t| (e.key.clone(), t)))
                .collect(),
        ))
    }

    pub fn world_size(&self) -> usize {
        self.world
    }
}

/// Broadcasts every entry from its owner, in buckets of at most `bucket_bytes` per owner (and
/// kind), handing each entry's flat values to `receive` on every rank. `local` must hold the
/// entries this rank owns.
fn exchange(
    pg: &ProcessGroup,
    entries: &[Entry],
    local: &HashMap<&str, &Tensor>,
    bucket_bytes: usize,
    mut receive: impl FnMut(&Entry, &Tensor),
) -> Result<()> {
    let rank = pg.rank();
    for owner in 0..pg.world_size() {
        let owned: Vec<&Entry> = entries.iter().filter(|e| e.owner == owner).collect();
        let mut start = 0;
        while start < owned.len() {
            // A bucket: entries of one kind, up to bucket_bytes (at least one entry).
            let kind = owned[start].kind;
            let (mut end, mut bytes) = (start, 0usize);
            while end < owned.len()
                && owned[end].kind == kind
                && (end == start || bytes < bucket_bytes)
            {
                bytes += numel(owned[end]) * kind.elt_size_in_bytes();
                end += 1;
            }
            let bucket = &owned[start..end];
            let total: i64 = bucket.iter().map(|e| numel(e) as i64).sum();
            let mut flat = if rank == owner {
                let parts = bucket
                    .iter()
                    .map(|e| {
                        local
                            .get(e.key.as_str())
                            .map(|t| t.reshape([-1]))
                            .with_context(|| format!("rank {rank} owns `{}` but lacks it", e.key))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            } else {
                Tensor::empty([total], (kind, pg.device()))
            };
            pg.broadcast(&mut flat, owner)
                .with_context(|| format!("broadcast from rank {owner}"))?;
            let mut offset = 0i64;
            for e in bucket {
                let n = numel(e) as i64;
                receive(e, &flat.narrow(0, offset, n));
                offset += n;
            }
            start = end;
        }
    }
    Ok(())
}

fn numel(e: &Entry) -> usize {
    e.shape.iter().product::<i64>() as usize
}

#[cfg(test)]
mod tests {
    use super::partition;

    #[test]
    fn partition_balances_largest_first_and_owns_each_tensor_once() {
        // 100 → 0, 60 → 1, 50 → 1 (60 < 100), 40 → 0 (100 < 110), then the 1s to rank 1.
        let sizes = [40, 100, 50, 60, 1, 1];
        let owners = partition(&sizes, 2);
        assert_eq!(owners, vec![0, 0, 1, 1, 1, 1]);
        let load = |r| {
            sizes
                .iter()
                .zip(&owners)
                .filter(|(_, &o)| o == r)
                .map(|(s, _)| s)
                .sum::<usize>()
        };
        assert_eq!((load(0), load(1)), (140, 112));
        // More ranks than tensors: some own nothing; one rank owns everything.
        assert_eq!(partition(&[5, 3], 4), vec![0, 1]);
        assert_eq!(partition(&[5, 3, 2], 1), vec![0, 0, 0]);
    }
}
