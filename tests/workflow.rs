//! What a user does after `fit`: save, evaluate, predict (test images and picture files), run
//! records, JSON output, and checkpoints that survive SIGKILL and resume to the same weights.

mod common;

use std::path::Path;

use common::*;
use gpu_mnist::checkpoint;
use gpu_mnist::data::IMAGE_PIXELS;

/// A quickly trained model (3 epochs on 30,000 images, about 97 % accurate).
fn trained_model(dir: &Path) -> String {
    let model = dir.join("m.safetensors").to_string_lossy().to_string();
    let out = dir.join("run").to_string_lossy().to_string();
    let d = data_arg();
    run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "3",
        "--train-limit",
        "30000",
        "--save",
        &model,
        "--out",
        &out,
        "--quiet",
    ]);
    model
}

fn write_png_gray(path: &Path, w: usize, h: usize, pixels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().unwrap().write_image_data(pixels).unwrap();
}

/// The digit scaled to 100x100 (nearest neighbour) and drawn dark on light.
fn scaled_dark_on_light(digit: &[u8]) -> Vec<u8> {
    (0..100 * 100)
        .map(|i| 255 - digit[(i / 100 * 28 / 100) * 28 + (i % 100) * 28 / 100])
        .collect()
}

fn predicted_digit(line: &str) -> u8 {
    let rest = line
        .split("predicted ")
        .nth(1)
        .unwrap_or_else(|| panic!("no prediction in {line}"));
    rest[..1].parse().unwrap()
}

#[test]
fn predict_reads_test_images_and_picture_files_the_mnist_way() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let d = data_arg();
    let out = run_ok(&[
        "predict", "--device", "cpu", "--data", &d, "--model", &model, "--index", "0",
    ]);
    println!("{out}");
    assert!(out.starts_with("test image 0: predicted 7 with probability"), "{out}");
    assert!(out.contains("true label 7"));
    let probs: Vec<f64> = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(probs.len(), 10);
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-3, "{probs:?}");

    // Test digits written as PNG files, as they are and scaled to 100x100 dark on light.
    let test = mnist().test;
    let mut paths = Vec::new();
    let n = 20;
    for i in 0..n {
        let digit = &test.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS];
        let plain = dir.path().join(format!("digit{i}.png"));
        write_png_gray(&plain, 28, 28, digit);
        let big = dir.path().join(format!("big{i}.png"));
        write_png_gray(&big, 100, 100, &scaled_dark_on_light(digit));
        paths.push((plain, big));
    }
    let index_out = run_ok(&[
        "predict",
        "--device",
        "cpu",
        "--data",
        &d,
        "--model",
        &model,
        "--index",
        &format!("0..{n}"),
    ]);
    let by_index: Vec<u8> = index_out
        .lines()
        .filter(|l| l.starts_with("test image"))
        .map(predicted_digit)
        .collect();
    let mut args = vec![
        "predict".to_string(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model.clone(),
    ];
    args.extend(
        paths
            .iter()
            .flat_map(|(a, b)| [a.to_string_lossy().to_string(), b.to_string_lossy().to_string()]),
    );
    let files_out = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let by_file: Vec<u8> = files_out
        .lines()
        .filter(|l| l.contains(".png: predicted"))
        .map(predicted_digit)
        .collect();
    assert_eq!(by_file.len(), 2 * n);
    let labels = &test.labels[..n];
    let plain: Vec<u8> = by_file.iter().step_by(2).copied().collect();
    let big: Vec<u8> = by_file.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(
        plain, by_index,
        "a 28x28 PNG must predict exactly as the test image itself"
    );
    let right = |v: &[u8]| v.iter().zip(labels).filter(|(a, b)| a == b).count();
    println!(
        "labels {labels:?}\n28x28  {plain:?} ({} right)\n100x100 {big:?} ({} right)",
        right(&plain),
        right(&big)
    );
    assert!(
        right(&big) >= n - 1,
        "scaled dark-on-light digits: only {} of {n} right",
        right(&big)
    );
}

#[test]
fn evaluate_reports_accuracy_confusion_and_misclassified_picture() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let picture = dir.path().join("wrong.png");
    let d = data_arg();
    let out = run_ok(&[
        "evaluate",
        "--device",
        "cpu",
        "--data",
        &d,
        "--model",
        &model,
        "--misclassified",
        picture.to_str().unwrap(),
    ]);
    println!("{out}");
    assert!(out.contains("confusion matrix"));
    let rows: Vec<&str> = out.lines().filter(|l| l.ends_with("% right")).collect();
    assert_eq!(rows.len(), 10);
    let png = std::fs::read(&picture).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The run folder of the training: config, one CSV row per epoch, and a learning curve.
    let run = dir.path().join("run");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let svg = std::fs::read_to_string(run.join("learning_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("epoch") && svg.contains("accuracy (%)"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["epochs"], 3);
    assert_eq!(config["lr"], 0.001);
}

#[test]
fn json_output_and_pipes_carry_no_control_characters() {
    let d = data_arg();
    let out = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "2",
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "--validation-split",
        "0.2",
        "--json",
        "--out",
        tempfile::tempdir().unwrap().path().to_str().unwrap(),
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["epoch"], 1);
    assert!(lines[1]["val_accuracy"].as_f64().unwrap() > 0.5);
    assert!(lines[2]["test_accuracy"].as_f64().unwrap() > 0.5);
    let plain = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "1",
        "--train-limit",
        "2000",
        "--test-limit",
        "500",
        "--out",
        tempfile::tempdir().unwrap().path().to_str().unwrap(),
    ]);
    assert!(
        !plain.contains('\x1b') && !plain.contains('\r'),
        "control characters in piped output: {plain:?}"
    );
}

#[test]
fn a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let common = [
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "4",
        "--train-limit",
        "30000",
        "--seed",
        "3",
    ];
    // The uninterrupted run.
    run_ok(
        &[
            &common[..],
            &[
                "--checkpoint-dir",
                &p("a"),
                "--out",
                &p("run-a"),
                "--save",
                &p("a.safetensors"),
                "--quiet",
            ],
        ]
        .concat(),
    );
    // The same run, killed with SIGKILL once its first checkpoint exists.
    let mut child = bin()
        .args(
            [
                &common[..],
                &["--checkpoint-dir", &p("b"), "--out", &p("run-b"), "--quiet"],
            ]
            .concat(),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ck = dir.path().join("b/checkpoint.safetensors");
    wait_for_file(&ck);
    child.kill().unwrap();
    child.wait().unwrap();
    let state = checkpoint::load(&ck)
        .expect("the last checkpoint is complete and loadable")
        .state
        .unwrap();
    let done = state["epochs_done"].as_u64().unwrap();
    println!("killed after {done} epoch(s)");
    let resumed = run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--resume",
        &p("b"),
        "--save",
        &p("b.safetensors"),
    ]);
    println!("{resumed}");
    if done < 4 {
        assert!(
            resumed.contains(&format!("resuming after epoch {done} of 4")),
            "{resumed}"
        );
    }
    let (a, b) = (
        checkpoint::load(Path::new(&p("a.safetensors"))).unwrap(),
        checkpoint::load(Path::new(&p("b.safetensors"))).unwrap(),
    );
    assert_eq!(
        a.params, b.params,
        "the resumed run must end with the uninterrupted run's weights"
    );
    let csv = std::fs::read_to_string(dir.path().join("run-b/metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        5,
        "every epoch is in the resumed run's metrics: {csv}"
    );
}

/// `--resume` with nothing else continues where and as the run ran: its data folder (no
/// GPU_MNIST_DATA, an empty cache and --offline, so nothing else could supply the files), its
/// test limit and its device; flags given again win.
#[test]
fn resume_reuses_the_runs_data_folder_test_limit_and_device() {
    let d = data_arg();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    run_ok(&[
        "train",
        "--device",
        "cpu",
        "--data",
        &d,
        "--epochs",
        "1",
        "--train-limit",
        "1280",
        "--test-limit",
        "300",
        "--checkpoint-dir",
        &p("ck"),
        "--out",
        &p("run"),
        "--quiet",
    ]);
    let resume = |extra: &[&str]| {
        let out = bin()
            .args(["train", "--resume", &p("ck"), "--offline"])
            .args(extra)
            .env("HOME", dir.path().join("home"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        stdout
    };
    let second = resume(&["--epochs", "2"]);
    println!("{second}");
    // Found offline with an empty cache: the run's own folder.
    assert!(second.contains("(1280 training, 300 test images)"), "{second}");
    assert!(second.contains("(--device cpu)"), "{second}");
    assert!(second.contains("(300 images)"), "{second}");
    let third = resume(&["--epochs", "3", "--test-limit", "200", "--device", "reference"]);
    println!("{third}");
    assert!(
        third.contains("(--device reference)") && third.contains("(200 images)"),
        "{third}"
    );
}

/// A test digit as a phone might photograph it: dark ink on grey paper lit unevenly (a gradient
/// from 150 to 225), blurred by a 3x3 box, with noise, 240x240, 8-bit grey.
fn photo_of(digit: &[u8]) -> Vec<u8> {
    let side = 240;
    let ink = |x: usize, y: usize| {
        // The digit fills the middle 168 pixels (6 per MNIST pixel), as on a page.
        let (dx, dy) = (x as i64 - 36, y as i64 - 36);
        if (0..168).contains(&dx) && (0..168).contains(&dy) {
            digit[(dy as usize / 6) * 28 + dx as usize / 6] as f32 / 255.0
        } else {
            0.0
        }
    };
    let mut seed = 12345u32;
    (0..side * side)
        .map(|i| {
            let (x, y) = (i % side, i / side);
            let paper = 150.0 + 75.0 * (x + y) as f32 / (2 * side) as f32;
            let mut blur = 0.0;
            for (ox, oy) in [
                (0usize, 0usize),
                (1, 0),
                (2, 0),
                (0, 1),
                (1, 1),
                (2, 1),
                (0, 2),
                (1, 2),
                (2, 2),
            ] {
                blur += ink((x + ox).saturating_sub(1), (y + oy).saturating_sub(1)) / 9.0;
            }
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let noise = (seed >> 24) as f32 / 255.0 * 16.0 - 8.0;
            (paper - 120.0 * blur + noise).clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// A little-endian TIFF block holding one EXIF tag: Orientation.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut v = b"II*\0".to_vec();
    v.extend(8u32.to_le_bytes());
    v.extend(1u16.to_le_bytes());
    v.extend(0x0112u16.to_le_bytes());
    v.extend(3u16.to_le_bytes());
    v.extend(1u32.to_le_bytes());
    v.extend(value.to_le_bytes());
    v.extend([0, 0]);
    v.extend(0u32.to_le_bytes());
    v
}

#[test]
fn a_photo_as_jpeg_turned_by_exif_reads_as_its_png() {
    use image::ImageEncoder;
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let test = mnist().test;
    let side = 240u32;
    let mut files = Vec::new();
    for i in 0..8 {
        let photo = photo_of(&test.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]);
        let png = dir.path().join(format!("photo{i}.png"));
        write_png_gray(&png, side as usize, side as usize, &photo);
        // The JPEG holds the photo turned a quarter left, and EXIF orientation 6 ("turn it a
        // quarter right to show it"), as a phone held sideways writes it.
        let upright = image::GrayImage::from_raw(side, side, photo).unwrap();
        let stored = image::imageops::rotate270(&upright);
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92);
        encoder.set_exif_metadata(exif_orientation(6)).unwrap();
        encoder
            .write_image(stored.as_raw(), side, side, image::ExtendedColorType::L8)
            .unwrap();
        let jpg = dir.path().join(format!("photo{i}.jpg"));
        std::fs::write(&jpg, jpeg).unwrap();
        files.push((png, jpg));
    }
    let mut args = vec![
        "predict".to_string(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model,
    ];
    args.extend(
        files
            .iter()
            .flat_map(|(p, j)| [p.display().to_string(), j.display().to_string()]),
    );
    let out = run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let predicted: Vec<u8> = out
        .lines()
        .filter(|l| l.contains(": predicted"))
        .map(predicted_digit)
        .collect();
    assert_eq!(predicted.len(), 16, "{out}");
    let (png, jpg): (Vec<u8>, Vec<u8>) = (
        predicted.iter().step_by(2).copied().collect(),
        predicted.iter().skip(1).step_by(2).copied().collect(),
    );
    let labels = &test.labels[..8];
    println!("labels {labels:?}\nPNG    {png:?}\nJPEG   {jpg:?}");
    assert_eq!(
        png, jpg,
        "a JPEG photo (turned by EXIF) and the PNG of the same photo must agree"
    );
    let right = png.iter().zip(labels).filter(|(a, b)| a == b).count();
    assert!(right >= 7, "photos of test digits: only {right} of 8 right");
}

#[test]
fn several_pictures_each_get_a_line_and_a_bad_one_does_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained_model(dir.path());
    let test = mnist().test;
    let good = |i: usize| {
        let p = dir.path().join(format!("d{i}.png"));
        write_png_gray(&p, 28, 28, &test.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]);
        p.display().to_string()
    };
    let (a, b) = (good(0), good(1));
    let bad = dir.path().join("notes.txt");
    std::fs::write(&bad, b"not a picture").unwrap();
    let bad = bad.display().to_string();
    let (code, stdout, stderr) = run_any(&["predict", "--device", "cpu", "--model", &model, &a, &bad, &b]);
    println!("{stdout}{stderr}");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stdout.contains(&format!("{a}: predicted")) && stdout.contains(&format!("{b}: predicted")),
        "{stdout}"
    );
    let errors: Vec<&str> = stderr.lines().collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].contains(&bad) && errors[0].contains("not a picture"),
        "{stderr}"
    );
    assert!(errors[1].contains("1 of 3 pictures"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // With --index and only a bad picture: the test image is predicted, the picture named.
    let d = data_arg();
    let (code, stdout, stderr) = run_any(&[
        "predict", "--device", "cpu", "--data", &d, "--model", &model, "--index", "0", &bad,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.contains("test image 0: predicted"), "{stdout}");
    let errors: Vec<&str> = stderr.lines().collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].contains(&bad) && errors[1].contains("1 of 1 pictures"),
        "{stderr}"
    );
}
