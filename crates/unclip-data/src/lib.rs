//! Data for unCLIP training. So far: the synthetic shapes dataset (the embedded default) and its
//! WebDataset shard writer.

pub mod degrade;
pub mod reader;
pub mod shapes;
pub mod shards;
