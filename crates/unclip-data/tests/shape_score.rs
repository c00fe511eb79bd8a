//! The model-free shape scorer: the same verdicts as scripts/check/shape_score.py on exact and
//! badly drawn scenes (fixtures from scripts/fixtures/shape_verdicts.py), and on the generator's own
//! images it finds the shapes that are drawn, whichever they are.
use std::path::Path;

use image::{GenericImageView, RgbImage};
use unclip_data::shape_score::{score_scene, ShapeTally, Verdict};
use unclip_data::shapes::{render, sample_rng, Scene, Shape, SHAPES};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shape_score")
}

fn shape(name: &serde_json::Value) -> Option<Shape> {
    name.as_str()
        .map(|n| SHAPES.into_iter().find(|s| s.name() == n).unwrap())
}

#[test]
fn verdicts_match_the_python_scorer() {
    let all: serde_json::Value =
        serde_json::from_reader(std::fs::File::open(fixtures().join("verdicts.json")).unwrap())
            .unwrap();
    let mut compared = 0;
    for (file, case) in all.as_object().unwrap() {
        let grid = image::open(fixtures().join(file)).unwrap().to_rgb8();
        let res = case["resolution"].as_u64().unwrap() as u32;
        let scenes: Vec<Scene> = serde_json::from_value(case["scenes"].clone()).unwrap();
        for (row, verdicts) in case["verdicts"].as_array().unwrap().iter().enumerate() {
            for (col, (scene, want)) in scenes.iter().zip(verdicts.as_array().unwrap()).enumerate()
            {
                let cell: RgbImage = grid
                    .view(col as u32 * res, row as u32 * res, res, res)
                    .to_image();
                let got: Vec<(Shape, Option<Shape>)> = score_scene(&cell, scene)
                    .iter()
                    .map(|v| (v.truth, v.drawn))
                    .collect();
                let want: Vec<(Shape, Option<Shape>)> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (shape(&p[0]).unwrap(), shape(&p[1])))
                    .collect();
                assert_eq!(got, want, "{file} row {row} scene {col}: {scene:?}");
                compared += got.len();
            }
        }
    }
    assert!(compared > 200, "{compared} objects compared");
}

fn tally_over(scenes: &[Scene], res: u32, draw: impl Fn(&Scene) -> Scene) -> (ShapeTally, usize) {
    let mut tally = ShapeTally::default();
    let mut as_drawn = 0;
    for scene in scenes {
        let drawn = draw(scene);
        let verdicts: Vec<Verdict> = score_scene(&render(&drawn, res), scene);
        for v in &verdicts {
            let shape = drawn.objects.get(v.object).map(|o| o.shape);
            as_drawn += usize::from(shape.is_some() && v.drawn == shape);
        }
        tally.add(&verdicts);
    }
    (tally, as_drawn)
}

fn scenes(count: u64) -> Vec<Scene> {
    (0..count)
        .map(|i| Scene::sample(&mut sample_rng(5, i)))
        .collect()
}

#[test]
fn the_generators_images_score_their_own_shapes() {
    let scenes = scenes(150);
    for res in [32, 64] {
        let (tally, _) = tally_over(&scenes, res, Scene::clone);
        assert_eq!(tally.missing, 0, "{res} px: {tally}");
        // Small objects at 32 px are a few pixels wide: not every outline can be told apart.
        let floor = if res == 32 { 0.85 } else { 0.95 };
        assert!(tally.fraction_right() >= floor, "{res} px: {tally}");
    }
}

#[test]
fn scenes_redrawn_in_other_shapes_score_the_drawn_shapes() {
    let scenes = scenes(150);
    let other = |scene: &Scene| {
        let mut s = scene.clone();
        for o in &mut s.objects {
            let i = SHAPES.iter().position(|x| *x == o.shape).unwrap();
            o.shape = SHAPES[(i + 1 + i % 4) % SHAPES.len()];
        }
        s
    };
    let (tally, as_drawn) = tally_over(&scenes, 64, other);
    assert_eq!(tally.missing, 0, "{tally}");
    assert_eq!(
        tally.right, 0,
        "every true shape was redrawn as another: {tally}"
    );
    assert!(
        as_drawn as f64 >= 0.95 * tally.objects as f64,
        "{as_drawn} of {} found as drawn",
        tally.objects
    );
}

#[test]
fn an_empty_image_has_every_object_missing() {
    let scenes = scenes(20);
    let (tally, _) = tally_over(&scenes, 32, |s| Scene {
        objects: Vec::new(),
        ..s.clone()
    });
    assert_eq!(tally.missing, tally.objects, "{tally}");
    assert_eq!(tally.right, 0);
}
