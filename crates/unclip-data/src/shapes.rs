//! The synthetic shapes dataset, the project's embedded default: 1–3 flat shapes of 8 colours and
//! 3 sizes on a plain background, anti-aliased at any resolution, a caption in varied wording and
//! the exact scene as JSON, so generated images can later be scored with no learned model.
//! Deterministic: sample `i` of seed `s` is the same on any machine and in any order.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Hexagon,
    Diamond,
}

pub const SHAPES: [Shape; 6] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Star,
    Shape::Hexagon,
    Shape::Diamond,
];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Hexagon => "hexagon",
            Shape::Diamond => "diamond",
        }
    }
}

/// Object colours (name, sRGB).
pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [245, 140, 30]),
    ("pink", [240, 120, 180]),
    ("cyan", [40, 200, 210]),
];

/// Background colours, distinct from every object colour.
pub const BACKGROUNDS: [(&str, [u8; 3]); 4] = [
    ("white", [250, 250, 250]),
    ("black", [20, 20, 20]),
    ("gray", [128, 128, 128]),
    ("beige", [225, 210, 180]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    /// Circumradius as a fraction of the image side.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.09,
            Size::Medium => 0.14,
            Size::Large => 0.19,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }
}

/// One object; coordinates are fractions of the image side, x to the right, y down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: String,
    pub rgb: [u8; 3],
    pub size: Size,
    pub centre: [f32; 2],
    pub radius: f32,
    /// Degrees, counter-clockwise.
    pub rotation: f32,
}

/// Everything needed to redraw or score an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: String,
    pub background_rgb: [u8; 3],
    pub objects: Vec<Object>,
}

/// The generator for sample `index` of `seed`: independent of every other sample.
pub fn sample_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

impl Scene {
    /// 1–3 non-overlapping objects that fit inside the image.
    pub fn sample(rng: &mut impl Rng) -> Scene {
        let (bg_name, bg_rgb) = BACKGROUNDS[rng.gen_range(0..BACKGROUNDS.len())];
        let count = rng.gen_range(1..=3);
        let mut objects: Vec<Object> = Vec::new();
        let mut attempts = 0;
        while objects.len() < count && attempts < 200 {
            attempts += 1;
            let size = [Size::Small, Size::Medium, Size::Large][rng.gen_range(0..3)];
            let r = size.radius();
            let margin = 0.02;
            let centre = [
                rng.gen_range(r + margin..1.0 - r - margin),
                rng.gen_range(r + margin..1.0 - r - margin),
            ];
            let clear = objects.iter().all(|o| {
                let (dx, dy) = (o.centre[0] - centre[0], o.centre[1] - centre[1]);
                (dx * dx + dy * dy).sqrt() > o.radius + r + 0.04
            });
            if !clear {
                continue;
            }
            // Distinct colour–shape pairs keep every caption unambiguous.
            let shape = SHAPES[rng.gen_range(0..SHAPES.len())];
            let (colour, rgb) = COLOURS[rng.gen_range(0..COLOURS.len())];
            if objects
                .iter()
                .any(|o| o.shape == shape && o.colour == colour)
            {
                continue;
            }
            let rotation = if shape == Shape::Circle {
                0.0
            } else {
                rng.gen_range(-20.0..20.0)
            };
            objects.push(Object {
                shape,
                colour: colour.into(),
                rgb,
                size,
                centre,
                radius: r,
                rotation,
            });
        }
        Scene {
            background: bg_name.into(),
            background_rgb: bg_rgb,
            objects,
        }
    }
}

fn length(x: f32, y: f32) -> f32 {
    (x * x + y * y).sqrt()
}

/// Signed distance (negative inside) from (x, y), relative to the object's centre in y-up
/// coordinates, to the shape of circumradius r (Inigo Quilez's 2-D distance functions).
fn signed_distance(shape: Shape, x: f32, y: f32, r: f32) -> f32 {
    match shape {
        Shape::Circle => length(x, y) - r,
        Shape::Square | Shape::Diamond => {
            let (x, y) = if shape == Shape::Diamond {
                let c = std::f32::consts::FRAC_1_SQRT_2;
                (c * (x - y), c * (x + y))
            } else {
                (x, y)
            };
            let s = r * std::f32::consts::FRAC_1_SQRT_2;
            let (dx, dy) = (x.abs() - s, y.abs() - s);
            length(dx.max(0.0), dy.max(0.0)) + dx.max(dy).min(0.0)
        }
        Shape::Triangle => {
            let k = 3f32.sqrt();
            let h = r * k / 2.0; // half the side of the triangle with circumradius r
            let (mut px, mut py) = (x.abs() - h, y + h / k);
            if px + k * py > 0.0 {
                (px, py) = ((px - k * py) / 2.0, (-k * px - py) / 2.0);
            }
            px -= px.clamp(-2.0 * h, 0.0);
            -length(px, py) * py.signum()
        }
        Shape::Star => {
            let (k1x, k1y) = (0.809_017_f32, -0.587_785_f32);
            let (k2x, k2y) = (-k1x, k1y);
            let (mut px, mut py) = (x.abs(), y);
            let d1 = 2.0 * (k1x * px + k1y * py).max(0.0);
            px -= d1 * k1x;
            py -= d1 * k1y;
            let d2 = 2.0 * (k2x * px + k2y * py).max(0.0);
            px -= d2 * k2x;
            py -= d2 * k2y;
            px = px.abs();
            py -= r;
            let rf = 0.45;
            let (bax, bay) = (rf * -k1y, rf * k1x - 1.0);
            let h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, r);
            length(px - bax * h, py - bay * h) * (py * bax - px * bay).signum()
        }
        Shape::Hexagon => {
            let (kx, ky, kz) = (-0.866_025_4_f32, 0.5_f32, 0.577_350_3_f32);
            let ri = r * 0.866_025_4; // inradius
            let (mut px, mut py) = (x.abs(), y.abs());
            let d = 2.0 * (kx * px + ky * py).min(0.0);
            px -= d * kx;
            py -= d * ky;
            px -= px.clamp(-kz * ri, kz * ri);
            py -= ri;
            length(px, py) * py.signum()
        }
    }
}

/// An object's outline placed in the image: what `render` draws, and what the shape scorer
/// compares a generated region with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outline {
    shape: Shape,
    centre: [f32; 2],
    radius: f32,
    sin: f32,
    cos: f32,
}

impl Outline {
    /// `centre` in fractions of the image side (y down), `rotation` in degrees counter-clockwise.
    pub(crate) fn new(shape: Shape, centre: [f32; 2], radius: f32, rotation: f32) -> Self {
        let (sin, cos) = (-rotation.to_radians()).sin_cos();
        Self {
            shape,
            centre,
            radius,
            sin,
            cos,
        }
    }

    /// The fraction of pixel (px, py) of a `res`-pixel image inside the outline, in [0, 1]: the
    /// signed distance at the pixel's centre, one pixel wide (anti-aliasing).
    pub(crate) fn coverage(&self, px: f32, py: f32, res: f32) -> f32 {
        let x = (px + 0.5) / res - self.centre[0];
        let y = self.centre[1] - (py + 0.5) / res; // y up
        let (rx, ry) = (self.cos * x - self.sin * y, self.sin * x + self.cos * y);
        (0.5 - signed_distance(self.shape, rx, ry, self.radius) * res).clamp(0.0, 1.0)
    }
}

/// Renders `scene` at `resolution`² pixels, RGB, anti-aliased by pixel coverage of the distance.
pub fn render(scene: &Scene, resolution: u32) -> image::RgbImage {
    let res = resolution as f32;
    let mut img =
        image::RgbImage::from_pixel(resolution, resolution, image::Rgb(scene.background_rgb));
    for o in &scene.objects {
        let outline = Outline::new(o.shape, o.centre, o.radius, o.rotation);
        // Only the pixels of the bounding square (plus one for the edge) can change.
        let lo =
            |c: f32| (((c - o.radius) * res).floor() as i64 - 1).clamp(0, resolution as i64) as u32;
        let hi =
            |c: f32| (((c + o.radius) * res).ceil() as i64 + 1).clamp(0, resolution as i64) as u32;
        for py in lo(o.centre[1])..hi(o.centre[1]) {
            for px in lo(o.centre[0])..hi(o.centre[0]) {
                let coverage = outline.coverage(px as f32, py as f32, res);
                if coverage > 0.0 {
                    let p = img.get_pixel_mut(px, py);
                    for c in 0..3 {
                        p[c] = (p[c] as f32 * (1.0 - coverage) + o.rgb[c] as f32 * coverage).round()
                            as u8;
                    }
                }
            }
        }
    }
    img
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a small red circle" or "a red circle" (the size is left out a third of the time).
fn describe(o: &Object, rng: &mut impl Rng) -> String {
    let words = if rng.gen_bool(1.0 / 3.0) {
        format!("{} {}", o.colour, o.shape.name())
    } else {
        format!("{} {} {}", o.size.name(), o.colour, o.shape.name())
    };
    format!("{} {words}", article(&words))
}

/// Where `a` is relative to `b`, from their centres (y down).
pub fn relation(a: &Object, b: &Object) -> &'static str {
    let (dx, dy) = (a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]);
    if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            "to the left of"
        } else {
            "to the right of"
        }
    } else if dy < 0.0 {
        "above"
    } else {
        "below"
    }
}

/// A caption in varied wording that names every object's colour and shape, and for two objects
/// their spatial relation.
pub fn caption(scene: &Scene, rng: &mut impl Rng) -> String {
    let d: Vec<String> = scene.objects.iter().map(|o| describe(o, rng)).collect();
    let body = match d.len() {
        1 => d[0].clone(),
        2 => match rng.gen_range(0..3) {
            0 => format!(
                "{} {} {}",
                d[0],
                relation(&scene.objects[0], &scene.objects[1]),
                d[1]
            ),
            1 => format!(
                "{} {} {}",
                d[1],
                relation(&scene.objects[1], &scene.objects[0]),
                d[0]
            ),
            _ => format!("{} and {}", d[0], d[1]),
        },
        _ => {
            let mut order = d.clone();
            order.shuffle(rng);
            format!("{}, {} and {}", order[0], order[1], order[2])
        }
    };
    let bg = &scene.background;
    match rng.gen_range(0..5) {
        0 => format!("{body} on {} {bg} background", article(bg)),
        1 => format!("a picture of {body}"),
        2 => format!("{body}, {bg} background"),
        _ => body,
    }
}

/// One dataset sample: the scene, its caption and the PNG.
pub struct ShapesSample {
    pub key: String,
    pub scene: Scene,
    pub caption: String,
    pub png: Vec<u8>,
}

/// Sample `index` of `seed` at `resolution`.
pub fn make_sample(
    seed: u64,
    index: u64,
    resolution: u32,
) -> Result<ShapesSample, image::ImageError> {
    let mut rng = sample_rng(seed, index);
    let scene = Scene::sample(&mut rng);
    let caption = caption(&scene, &mut rng);
    let img = render(&scene, resolution);
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(ShapesSample {
        key: format!("{index:09}"),
        scene,
        caption,
        png,
    })
}
