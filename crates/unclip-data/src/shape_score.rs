//! Model-free scoring of generated shapes scenes: for every object of a scene, which of the six
//! shapes an image drew for it, wherever it put it — what a decoder's samples are judged by, since
//! the CLIP score hardly sees shapes. The rules of `scripts/check/shape_score.py` (parity-tested):
//!
//! every pixel takes the nearest of the background and the eight object colours; each object, the
//! largest first, takes the unclaimed connected region (4-connected, ≥ 2 pixels) of its colour
//! whose centroid is nearest its centre (none: missing); the region's shape is the one whose
//! outline — at any of the generator's sizes and rotations, on the region's centroid give or take
//! half a pixel — overlaps it best (intersection over union).

use std::fmt;

use image::RgbImage;

use crate::shapes::{Object, Outline, Scene, Shape, Size, COLOURS, SHAPES};

/// What an image drew for one object of its scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The object's index in `scene.objects`.
    pub object: usize,
    pub truth: Shape,
    pub size: Size,
    /// None: no region of the object's colour was left for it.
    pub drawn: Option<Shape>,
}

/// The scene's objects with their indices, in the order they claim regions: the largest first,
/// ties in scene order.
fn largest_first(scene: &Scene) -> Vec<(usize, &Object)> {
    let mut objects: Vec<_> = scene.objects.iter().enumerate().collect();
    objects.sort_by(|a, b| b.1.radius.total_cmp(&a.1.radius));
    objects
}

/// One connected region of a colour: its pixels (x, y) and centroid.
struct Region {
    pixels: Vec<(u32, u32)>,
    centroid: (f64, f64),
    /// min x, min y, max x, max y
    bounds: [u32; 4],
}

/// Each pixel's nearest of the background (0) and the object colours (1..=8).
fn nearest_colours(img: &RgbImage, background: [u8; 3]) -> Vec<u8> {
    let palette: Vec<[u8; 3]> = std::iter::once(background)
        .chain(COLOURS.iter().map(|(_, rgb)| *rgb))
        .collect();
    img.pixels()
        .map(|p| {
            let d =
                |c: &[u8; 3]| -> i32 { (0..3).map(|k| (p[k] as i32 - c[k] as i32).pow(2)).sum() };
            // The first of equally near colours, as numpy's argmin.
            let mut best = 0;
            for (i, c) in palette.iter().enumerate().skip(1) {
                if d(c) < d(&palette[best]) {
                    best = i;
                }
            }
            best as u8
        })
        .collect()
}

/// The 4-connected regions of label `colour` with at least 2 pixels, in raster order of their
/// first pixel (scipy's `ndimage.label` order).
fn regions(labels: &[u8], width: u32, height: u32, colour: u8) -> Vec<Region> {
    let mut seen = vec![false; labels.len()];
    let mut found = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || labels[start] != colour {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = ((i as u32) % width, (i as u32) / width);
            pixels.push((x, y));
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == colour {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width as usize);
            }
            if y + 1 < height {
                visit(i + width as usize);
            }
        }
        if pixels.len() >= 2 {
            let n = pixels.len() as f64;
            let cx = pixels.iter().map(|p| p.0 as f64).sum::<f64>() / n;
            let cy = pixels.iter().map(|p| p.1 as f64).sum::<f64>() / n;
            let bounds = pixels
                .iter()
                .fold([u32::MAX, u32::MAX, 0, 0], |b, &(x, y)| {
                    [b[0].min(x), b[1].min(y), b[2].max(x), b[3].max(y)]
                });
            found.push(Region {
                pixels,
                centroid: (cx, cy),
                bounds,
            });
        }
    }
    found
}

/// The shape whose outline, at any of the generator's sizes and rotations (−20…20° by 5°),
/// centred on the region's centroid ± half a pixel, has the best intersection over union with it.
fn classify(region: &Region, width: u32, height: u32) -> Shape {
    let res = width as f32;
    let mut mask = vec![false; (width * height) as usize];
    for &(x, y) in &region.pixels {
        mask[(y * width + x) as usize] = true;
    }
    let (cx, cy) = region.centroid;
    let radii = [Size::Small, Size::Medium, Size::Large].map(Size::radius);
    let (mut best_shape, mut best) = (Shape::Circle, -1.0f64);
    for shape in SHAPES {
        let rotations: Vec<f32> = if shape == Shape::Circle {
            vec![0.0]
        } else {
            (-20..=20).step_by(5).map(|r| r as f32).collect()
        };
        for &radius in &radii {
            for &rotation in &rotations {
                for dx in [-0.5, 0.0, 0.5] {
                    for dy in [-0.5, 0.0, 0.5] {
                        let centre = [
                            ((cx + 0.5 + dx) / res as f64) as f32,
                            ((cy + 0.5 + dy) / res as f64) as f32,
                        ];
                        let outline = Outline::new(shape, centre, radius, rotation);
                        // Pixels outside both the region and the outline's square count nothing.
                        let span = |c: f32, lo: u32, hi: u32, side: u32| {
                            let a = ((c - radius) * res).floor() as i64 - 1;
                            let b = ((c + radius) * res).ceil() as i64 + 1;
                            (
                                a.clamp(0, lo as i64) as u32,
                                b.clamp(hi as i64 + 1, side as i64) as u32,
                            )
                        };
                        let (x0, x1) = span(centre[0], region.bounds[0], region.bounds[2], width);
                        let (y0, y1) = span(centre[1], region.bounds[1], region.bounds[3], height);
                        let (mut both, mut either) = (0u32, 0u32);
                        for y in y0..y1 {
                            for x in x0..x1 {
                                let inside = outline.coverage(x as f32, y as f32, res) >= 0.5;
                                let in_region = mask[(y * width + x) as usize];
                                both += u32::from(inside && in_region);
                                either += u32::from(inside || in_region);
                            }
                        }
                        let iou = both as f64 / either.max(1) as f64;
                        if iou > best {
                            (best_shape, best) = (shape, iou);
                        }
                    }
                }
            }
        }
    }
    best_shape
}

/// For each object of `scene`, the largest first, the shape `img` drew for it. `img` is a square
/// image of the whole scene at any resolution.
pub fn score_scene(img: &RgbImage, scene: &Scene) -> Vec<Verdict> {
    let (width, height) = img.dimensions();
    let labels = nearest_colours(img, scene.background_rgb);
    let mut by_colour: Vec<Vec<Region>> = (1..=COLOURS.len() as u8)
        .map(|c| regions(&labels, width, height, c))
        .collect();
    largest_first(scene)
        .into_iter()
        .map(|(object, o)| {
            let colour = COLOURS.iter().position(|(name, _)| *name == o.colour);
            let candidates = match colour {
                Some(c) => &mut by_colour[c],
                None => &mut Vec::new(),
            };
            let target = (
                o.centre[0] as f64 * width as f64 - 0.5,
                o.centre[1] as f64 * height as f64 - 0.5,
            );
            let distance = |r: &Region| (r.centroid.0 - target.0).hypot(r.centroid.1 - target.1);
            let nearest = (0..candidates.len())
                .min_by(|&a, &b| distance(&candidates[a]).total_cmp(&distance(&candidates[b])));
            Verdict {
                object,
                truth: o.shape,
                size: o.size,
                drawn: nearest.map(|i| classify(&candidates.remove(i), width, height)),
            }
        })
        .collect()
}

/// Verdicts counted: how many shapes are right and how many objects are missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShapeTally {
    pub right: usize,
    pub missing: usize,
    pub objects: usize,
}

impl ShapeTally {
    pub fn add(&mut self, verdicts: &[Verdict]) {
        for v in verdicts {
            self.objects += 1;
            self.right += usize::from(v.drawn == Some(v.truth));
            self.missing += usize::from(v.drawn.is_none());
        }
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &ShapeTally) {
        self.right += other.right;
        self.missing += other.missing;
        self.objects += other.objects;
    }

    /// Right shapes as a fraction of all objects (0 when there are none).
    pub fn fraction_right(&self) -> f64 {
        self.right as f64 / self.objects.max(1) as f64
    }
}

impl fmt::Display for ShapeTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shape right {}/{} ({:.1} %), missing {}",
            self.right,
            self.objects,
            100.0 * self.fraction_right(),
            self.missing
        )
    }
}
