//! Data for unCLIP training: the synthetic shapes dataset (the embedded default), WebDataset
//! shards, CLIP's tokenizer, image transforms and degradations.

pub mod bsr;
pub mod degrade;
pub mod embedding_loader;
pub mod embeddings;
pub mod images;
pub mod loader;
pub mod npy;
mod prefetch;
pub mod reader;
pub mod shape_score;
pub mod shapes;
pub mod shards;
pub mod text_clean;
pub mod tokenizer;
pub mod word_swap;
