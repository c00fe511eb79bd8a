//! Caption cleaning exactly as CLIP / open_clip does it before BPE:
//! `whitespace_clean(basic_clean(text)).lower()` where `basic_clean` is `ftfy.fix_text`, two rounds
//! of `html.unescape`, and `strip`.
//!
//! Of ftfy's fixers, the deterministic ones are reproduced (HTML entities ending in `;`, C1 controls
//! as Windows-1252, Latin ligatures, full/half-width forms, curly quotes, line breaks, terminal
//! escapes, control characters, NFC, repeated until nothing changes). ftfy's mojibake repair
//! (`fix_encoding`) is a statistical heuristic and is not: text that is already valid Unicode
//! passes through it unchanged in practice, and shard captions are valid UTF-8 or skipped.

use std::sync::LazyLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// `str.isspace()`: Unicode White_Space plus the ASCII information separators U+001C–U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// open_clip's `_clean_lower`.
pub fn clean_caption(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    let text = text.trim_matches(is_py_space);
    let joined = text
        .split(is_py_space)
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    joined.to_lowercase()
}

/// Python's `html.unescape` (WHATWG rules for text, legacy entities without `;` included).
pub fn html_unescape(text: &str) -> String {
    if text.contains('&') {
        htmlize::unescape(text).into_owned()
    } else {
        text.to_string()
    }
}

/// `ftfy.fix_text` with its default config, minus `fix_encoding` (see the module docs).
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy turns HTML unescaping off for the rest of the text once a segment contains '<'.
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let original = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = text.chars().map(fix_c1_control).collect();
        text = fix_latin_ligatures(&text);
        text = fix_character_width(&text);
        text = uncurl_quotes(&text);
        text = fix_line_breaks(&text);
        text = ANSI_ESCAPE.replace_all(&text, "").into_owned();
        text.retain(|c| !is_unwanted_control(c));
        text = text.nfc().collect();
        if text == original {
            return text;
        }
    }
}

static HTML_ENTITY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").expect("valid regex"));
static ANSI_ESCAPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[[\d;]*[a-zA-Z]").expect("valid regex"));

/// ftfy's conservative unescape: only whole `&name;` entities of the HTML5 table, numeric
/// references, and all-caps spellings of lower-case entities (`&EACUTE;` → `É`).
fn ftfy_unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    HTML_ENTITY
        .replace_all(text, |caps: &regex::Captures| {
            let entity = &caps[0];
            if let Some(value) = htmlize::ENTITIES.get(entity.as_bytes()) {
                return String::from_utf8_lossy(value).into_owned();
            }
            if entity.starts_with("&#") {
                let decoded = htmlize::unescape(entity);
                // Only a reference that consumed its ';' counts.
                return if decoded.contains(';') {
                    entity.to_string()
                } else {
                    decoded.into_owned()
                };
            }
            let lower = entity.to_lowercase();
            if lower.to_uppercase() == entity && htmlize::unescape(entity) == entity {
                if let Some(value) = htmlize::ENTITIES.get(lower.as_bytes()) {
                    return String::from_utf8_lossy(value).to_uppercase();
                }
            }
            entity.to_string()
        })
        .into_owned()
}

/// C1 controls decoded as Windows-1252 ("sloppy": undefined bytes stay as they are).
fn fix_c1_control(c: char) -> char {
    const CP1252: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match c as u32 {
        0x80..=0x9f => CP1252[(c as u32 - 0x80) as usize],
        _ => c,
    }
}

fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let replacement = match c {
            'Ĳ' => "IJ",
            'ĳ' => "ij",
            'ŉ' => "ʼn",
            'Ǳ' => "DZ",
            'ǲ' => "Dz",
            'ǳ' => "dz",
            'Ǆ' => "DŽ",
            'ǅ' => "Dž",
            'ǆ' => "dž",
            'Ǉ' => "LJ",
            'ǈ' => "Lj",
            'ǉ' => "lj",
            'Ǌ' => "NJ",
            'ǋ' => "Nj",
            'ǌ' => "nj",
            'ﬀ' => "ff",
            'ﬁ' => "fi",
            'ﬂ' => "fl",
            'ﬃ' => "ffi",
            'ﬄ' => "ffl",
            'ﬅ' => "ſt",
            'ﬆ' => "st",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(replacement);
    }
    out
}

/// Half/full-width forms U+FF01–U+FFEF to their NFKC form, and U+3000 to a space.
fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c as u32 {
            0x3000 => out.push(' '),
            0xff01..=0xffef => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            _ => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .chars()
        .map(|c| match c {
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => '\n',
            _ => c,
        })
        .collect()
}

fn is_unwanted_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftfy_docstring_examples() {
        assert_eq!(
            fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!"),
            "Broken text… it's flubberific!"
        );
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(
            fix_text("&ntilde; &Ntilde; &NTILDE; &nTILDE;"),
            "ñ Ñ Ñ &nTILDE;"
        );
        assert_eq!(fix_text("<b>&lt;</b>"), "<b>&lt;</b>");
    }
}
