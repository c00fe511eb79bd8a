//! Hard-negative captions for contrastive training (NegCLIP, Yuksekgonul et al. 2023): one word of
//! a caption replaced by another word of its group ("a red square" → "a red circle"). A CLIP that
//! must rank an image's caption above such a twin has to encode what the swapped word names, and
//! for which object — where in-batch negatives, which differ in many words at once, let a bag of
//! words (or colours alone) win.

use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::HashMap;

/// A swap group that cannot be used, named by its index in the configured list.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WordSwapError {
    #[error("no groups: name at least one group of words to swap between")]
    NoGroups,
    #[error("group {group} ({words:?}) needs at least two words to swap between")]
    TooFew { group: usize, words: Vec<String> },
    #[error("group {group}: {word:?} is not a single word (letters and digits only)")]
    NotAWord { group: usize, word: String },
    #[error("{word:?} is listed twice (groups {first} and {second}): a word may appear once")]
    TwoGroups {
        word: String,
        first: usize,
        second: usize,
    },
}

/// Groups of interchangeable words (e.g. the shape names); matching is case-insensitive and
/// ignores punctuation around a word.
#[derive(Debug, Clone)]
pub struct WordSwap {
    groups: Vec<Vec<String>>,
    /// Lower-case word → its group.
    group_of: HashMap<String, usize>,
}

impl WordSwap {
    /// Each group needs two or more distinct words, and no word may be in two groups.
    pub fn new(groups: &[Vec<String>]) -> Result<Self, WordSwapError> {
        if groups.is_empty() {
            return Err(WordSwapError::NoGroups);
        }
        let mut group_of = HashMap::new();
        let mut lowered = Vec::with_capacity(groups.len());
        for (g, words) in groups.iter().enumerate() {
            if words.len() < 2 {
                return Err(WordSwapError::TooFew {
                    group: g,
                    words: words.clone(),
                });
            }
            let mut group = Vec::with_capacity(words.len());
            for w in words {
                let lw = w.to_lowercase();
                if lw.is_empty() || !lw.chars().all(char::is_alphanumeric) {
                    return Err(WordSwapError::NotAWord {
                        group: g,
                        word: w.clone(),
                    });
                }
                if let Some(first) = group_of.insert(lw.clone(), g) {
                    return Err(WordSwapError::TwoGroups {
                        word: w.clone(),
                        first,
                        second: g,
                    });
                }
                group.push(lw);
            }
            lowered.push(group);
        }
        Ok(Self {
            groups: lowered,
            group_of,
        })
    }

    /// The caption with one of its group words (picked at random) replaced by another word of the
    /// same group (at random); `None` when the caption holds no group word. Punctuation and a
    /// leading capital are kept.
    pub fn negative(&self, caption: &str, rng: &mut impl Rng) -> Option<String> {
        let pieces: Vec<&str> = caption.split(' ').collect();
        let candidates: Vec<(usize, usize, usize, usize)> = pieces
            .iter()
            .enumerate()
            .filter_map(|(i, piece)| {
                let start = piece.find(char::is_alphanumeric)?;
                let (last, c) = piece.char_indices().rfind(|(_, c)| c.is_alphanumeric())?;
                let end = last + c.len_utf8();
                let group = *self.group_of.get(&piece[start..end].to_lowercase())?;
                Some((i, start, end, group))
            })
            .collect();
        let &(i, start, end, group) = candidates.choose(rng)?;
        let word = &pieces[i][start..end];
        let lower = word.to_lowercase();
        let others: Vec<&String> = self.groups[group].iter().filter(|w| **w != lower).collect();
        let mut replacement = (*others.choose(rng)?).clone();
        if word.chars().next().is_some_and(char::is_uppercase) {
            let mut chars = replacement.chars();
            replacement = chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default();
        }
        let swapped = format!("{}{replacement}{}", &pieces[i][..start], &pieces[i][end..]);
        let mut out: Vec<&str> = pieces.clone();
        out[i] = &swapped;
        Some(out.join(" "))
    }

    /// One negative per caption, from an RNG seeded with `seed` (a batch's negatives are then a
    /// function of the seed alone, so a resumed run draws the same ones).
    pub fn negatives(&self, captions: &[String], seed: u64) -> Vec<Option<String>> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        captions
            .iter()
            .map(|c| self.negative(c, &mut rng))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> WordSwap {
        let words = ["circle", "square", "triangle", "star", "hexagon", "diamond"];
        WordSwap::new(&[words.iter().map(|w| w.to_string()).collect()]).unwrap()
    }

    fn words(s: &str) -> Vec<&str> {
        s.split(' ').collect()
    }

    #[test]
    fn exactly_one_group_word_changes_to_another_of_its_group() {
        let swap = shapes();
        let caption =
            "a small cyan square, a green star and a large blue square on a white background";
        let mut seen = std::collections::HashSet::new();
        for seed in 0..200 {
            let neg = swap.negatives(&[caption.to_string()], seed)[0]
                .clone()
                .unwrap();
            let (a, b) = (words(caption), words(&neg));
            assert_eq!(a.len(), b.len());
            let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            assert_eq!(changed.len(), 1, "{neg}");
            let i = changed[0];
            let (old, new) = (a[i].trim_end_matches(','), b[i].trim_end_matches(','));
            assert_ne!(old, new);
            assert!(swap.group_of.contains_key(new), "{new} is not a shape");
            assert_eq!(
                a[i].ends_with(','),
                b[i].ends_with(','),
                "punctuation lost: {neg}"
            );
            seen.insert((i, new.to_string()));
        }
        // Every occurrence (positions 3, 6, 11) and every other shape gets drawn.
        assert!(
            [3, 6, 11].iter().all(|p| seen.iter().any(|(i, _)| i == p)),
            "{seen:?}"
        );
        assert!(seen.len() >= 12, "{seen:?}");
    }

    #[test]
    fn captions_without_group_words_get_none_and_seeds_repeat() {
        let swap = shapes();
        let captions = vec![
            "a red blob".to_string(),
            "Triangle.".to_string(),
            "a red circle".to_string(),
        ];
        let a = swap.negatives(&captions, 7);
        assert_eq!(a[0], None);
        let capital = a[1].as_deref().unwrap();
        assert!(capital.ends_with('.') && capital.starts_with(char::is_uppercase));
        assert_ne!(capital, "Triangle.");
        assert_eq!(a, swap.negatives(&captions, 7));
        let differs = (0..20).any(|s| swap.negatives(&captions, s)[2] != a[2]);
        assert!(differs, "the seed must matter");
    }

    #[test]
    fn bad_groups_are_rejected_with_the_word() {
        let g = |ws: &[&str]| ws.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let err = WordSwap::new(&[g(&["circle"])]).unwrap_err().to_string();
        assert!(err.contains("at least two"), "{err}");
        let err = WordSwap::new(&[g(&["red", "green"]), g(&["circle", "Red"])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"Red\""), "{err}");
        let err = WordSwap::new(&[g(&["red", "dark red"])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a single word"), "{err}");
        assert_eq!(WordSwap::new(&[]).unwrap_err(), WordSwapError::NoGroups);
    }
}
