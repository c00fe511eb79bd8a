//! CLIP's byte-level BPE tokenizer, id for id the same as open_clip's `SimpleTokenizer`: 49,408
//! tokens (256 byte symbols, the same with `</w>`, 48,894 merges, `<start_of_text>`,
//! `<end_of_text>`), CLIP's caption cleaning and pre-tokenisation, truncation that keeps the end
//! token, zero padding.
//!
//! The merges file (`bpe_simple_vocab_16e6.txt.gz`, from the `open_clip_torch` package) is compiled
//! into the binaries: `scripts/setup.sh` points `UNCLIP_CLIP_BPE` at it.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use crate::text_clean::clean_caption;

/// CLIP's context length.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;

static CLIP_BPE_GZ: &[u8] = include_bytes!(env!("UNCLIP_CLIP_BPE"));

/// Number of merges CLIP uses from the file (`49152 - 256 - 2`).
const NUM_MERGES: usize = 48_894;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading BPE merges {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("BPE merges {path}: {reason}")]
    Format { path: String, reason: String },
}

pub struct ClipTokenizer {
    /// Symbol string → id; on duplicates the later entry wins, as in Python's `dict(zip(...))`.
    encoder: HashMap<String, u32>,
    decoder: Vec<String>,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_symbol: [char; 256],
    byte_symbol_id: [u32; 256],
    byte_symbol_end_id: [u32; 256],
    sot: u32,
    eot: u32,
}

static PRETOKENIZE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    )
    .expect("valid regex")
});

/// GPT-2's reversible byte → printable character table.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xa1..=0xac).contains(&b)
            || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(code).expect("below the surrogate range");
    }
    table
}

impl ClipTokenizer {
    /// The tokenizer of every CLIP and open_clip model, from the compiled-in merges.
    pub fn new() -> Self {
        Self::from_gz_bytes(CLIP_BPE_GZ, "<embedded bpe_simple_vocab_16e6.txt.gz>")
            .expect("the embedded merges file is valid")
    }

    /// A tokenizer from another gzipped merges file in CLIP's format.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_gz_bytes(&bytes, &path.display().to_string())
    }

    fn from_gz_bytes(gz: &[u8], name: &str) -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|source| TokenizerError::Io {
                path: name.to_string(),
                source,
            })?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < NUM_MERGES + 1 {
            return Err(TokenizerError::Format {
                path: name.to_string(),
                reason: format!(
                    "{} lines, need a header and {NUM_MERGES} merges",
                    lines.len()
                ),
            });
        }
        let mut pairs = Vec::with_capacity(NUM_MERGES);
        for (i, line) in lines[1..=NUM_MERGES].iter().enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => pairs.push((a, b)),
                _ => {
                    return Err(TokenizerError::Format {
                        path: name.to_string(),
                        reason: format!("line {}: expected two symbols, got {line:?}", i + 2),
                    })
                }
            }
        }

        let byte_symbol = bytes_to_unicode();
        // Python's dict keeps insertion order: printable bytes first, then the remapped ones.
        let mut symbols: Vec<char> = byte_symbol.to_vec();
        symbols.sort_by_key(|&c| (u32::from(c) > 255, u32::from(c)));
        let mut decoder: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
        decoder.extend(symbols.iter().map(|c| format!("{c}</w>")));
        decoder.extend(pairs.iter().map(|(a, b)| format!("{a}{b}")));
        decoder.push("<start_of_text>".into());
        decoder.push("<end_of_text>".into());
        let encoder: HashMap<String, u32> = decoder
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();

        let id = |s: &str| -> Result<u32, TokenizerError> {
            encoder
                .get(s)
                .copied()
                .ok_or_else(|| TokenizerError::Format {
                    path: name.to_string(),
                    reason: format!("merge symbol {s:?} is not in the vocabulary"),
                })
        };
        let mut merges = HashMap::with_capacity(NUM_MERGES);
        for (rank, (a, b)) in pairs.iter().enumerate() {
            let merged = id(&format!("{a}{b}"))?;
            merges.insert((id(a)?, id(b)?), (rank as u32, merged));
        }
        let mut byte_symbol_id = [0; 256];
        let mut byte_symbol_end_id = [0; 256];
        for (b, c) in byte_symbol.iter().enumerate() {
            byte_symbol_id[b] = id(&c.to_string())?;
            byte_symbol_end_id[b] = id(&format!("{c}</w>"))?;
        }
        Ok(Self {
            sot: id("<start_of_text>")?,
            eot: id("<end_of_text>")?,
            encoder,
            decoder,
            merges,
            byte_symbol,
            byte_symbol_id,
            byte_symbol_end_id,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.decoder.len()
    }

    pub fn sot_id(&self) -> u32 {
        self.sot
    }

    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// Token ids of a caption, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean_caption(text);
        let mut ids = Vec::new();
        for word in PRETOKENIZE.find_iter(&cleaned) {
            match word.as_str() {
                "<start_of_text>" => ids.push(self.sot),
                "<end_of_text>" => ids.push(self.eot),
                w => self.bpe(w.as_bytes(), &mut ids),
            }
        }
        ids
    }

    /// Greedy lowest-rank merging of one pre-token's byte symbols.
    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let last = bytes.len() - 1;
        let mut word: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i == last {
                    self.byte_symbol_end_id[b as usize]
                } else {
                    self.byte_symbol_id[b as usize]
                }
            })
            .collect();
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| self.merges.get(&(w[0], w[1])).map(|&m| (m, (w[0], w[1]))))
                .min_by_key(|((rank, _), _)| *rank);
            let Some(((_, merged), (first, second))) = best else {
                break;
            };
            let mut next = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        out.extend(word);
    }

    /// `[sot] + encode(text) + [eot]`, cut to `context_length` with the end token kept last, padded
    /// with zeros: open_clip's `tokenize`.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let mut ids: Vec<i64> = Vec::with_capacity(context_length);
        ids.push(i64::from(self.sot));
        ids.extend(self.encode(text).into_iter().map(i64::from));
        ids.push(i64::from(self.eot));
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = i64::from(self.eot);
            }
        }
        ids.resize(context_length, 0);
        ids
    }

    /// Row-major `[texts.len(), context_length]` ids.
    pub fn tokenize_batch<S: AsRef<str>>(&self, texts: &[S], context_length: usize) -> Vec<i64> {
        texts
            .iter()
            .flat_map(|t| self.tokenize(t.as_ref(), context_length))
            .collect()
    }

    /// Text of token ids (start/end/padding included as written), `</w>` as spaces.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut symbols = String::new();
        for &id in ids {
            if let Some(s) = self.decoder.get(id as usize) {
                symbols.push_str(s);
            }
        }
        let mut bytes = Vec::with_capacity(symbols.len());
        let mut byte_of: HashMap<char, u8> = HashMap::with_capacity(256);
        for (b, &c) in self.byte_symbol.iter().enumerate() {
            byte_of.insert(c, b as u8);
        }
        for c in symbols.chars() {
            match byte_of.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend(c.to_string().as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).replace("</w>", " ")
    }

    /// The vocabulary symbol of an id.
    pub fn symbol(&self, id: u32) -> Option<&str> {
        self.decoder.get(id as usize).map(String::as_str)
    }

    /// Id of a vocabulary symbol.
    pub fn token_id(&self, symbol: &str) -> Option<u32> {
        self.encoder.get(symbol).copied()
    }

    /// The vocabulary as transformers' `CLIPTokenizer` reads it (`vocab.json`): symbol → id, the
    /// start and end tokens under transformers' names `<|startoftext|>` / `<|endoftext|>`.
    pub fn hf_vocab(&self) -> serde_json::Map<String, serde_json::Value> {
        self.encoder
            .iter()
            .map(|(symbol, &id)| {
                let name = match symbol.as_str() {
                    "<start_of_text>" => "<|startoftext|>",
                    "<end_of_text>" => "<|endoftext|>",
                    other => other,
                };
                (name.to_string(), id.into())
            })
            .collect()
    }

    /// The merges as transformers' `merges.txt`: a version line, then one merge per line in rank
    /// order.
    pub fn hf_merges(&self) -> String {
        let mut ranked: Vec<(u32, u32, u32)> = self
            .merges
            .iter()
            .map(|(&(a, b), &(rank, _))| (rank, a, b))
            .collect();
        ranked.sort_unstable();
        let mut text = String::from("#version: 0.2\n");
        for (_, a, b) in ranked {
            text.push_str(&self.decoder[a as usize]);
            text.push(' ');
            text.push_str(&self.decoder[b as usize]);
            text.push('\n');
        }
        text
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}
