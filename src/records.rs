//! The run folder of a training run: `config.json`, `metrics.csv` and `learning_curve.svg`.
//!
//! Contract: every file is rewritten whole (atomically) after each epoch, so the folder always
//! holds a consistent record of the epochs finished so far, even if the run is killed. The SVG is
//! self-contained and opens in any browser: loss and accuracy per epoch, training and validation,
//! with labelled axes and a legend.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};

/// One epoch's figures, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
    /// The learning rate of the epoch's last step (None in a history written before it was kept).
    pub lr: Option<f64>,
    /// The device that ran the epoch (it changes when --device auto falls back to the CPU).
    pub device: String,
}

/// The folder a run writes to.
#[derive(Debug, Clone)]
pub struct RunFolder {
    pub dir: PathBuf,
}

impl RunFolder {
    /// Create (or reuse) the folder.
    pub fn create(dir: &Path) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::usage(
                "--out",
                format!("{} exists and is not a folder", dir.display()),
            ));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::bad_file(dir, format!("could not create the run folder ({e})")))?;
        Ok(RunFolder { dir: dir.to_path_buf() })
    }

    /// `runs/run-YYYYmmdd-HHMMSS` (UTC) under the current folder.
    pub fn default_path() -> PathBuf {
        PathBuf::from("runs").join(format!("run-{}", utc_stamp()))
    }

    pub fn write_config(&self, config: &serde_json::Value) -> Result<()> {
        let text = serde_json::to_string_pretty(config).unwrap_or_else(|_| config.to_string());
        write_atomic(&self.dir.join("config.json"), format!("{text}\n").as_bytes())
    }

    /// result.json: the run's test result and what it ended with (the epoch whose weights early
    /// stopping kept).
    pub fn write_result(&self, result: &serde_json::Value) -> Result<()> {
        let text = serde_json::to_string_pretty(result).unwrap_or_else(|_| result.to_string());
        write_atomic(&self.dir.join("result.json"), format!("{text}\n").as_bytes())
    }

    /// Rewrite metrics.csv and learning_curve.svg from all epochs so far.
    pub fn write_epochs(&self, epochs: &[EpochRecord]) -> Result<()> {
        write_atomic(&self.dir.join("metrics.csv"), metrics_csv(epochs).as_bytes())?;
        write_atomic(
            &self.dir.join("learning_curve.svg"),
            learning_curve_svg(epochs).as_bytes(),
        )
    }
}

/// An f32 as the f64 of its shortest decimal (0.001, not 0.0010000000474974513), for records and
/// settings written as text.
pub fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds,lr,device (lr: the rate of the
/// epoch's last step).
pub fn metrics_csv(epochs: &[EpochRecord]) -> String {
    let mut out = String::from("epoch,train_loss,train_accuracy,val_loss,val_accuracy,seconds,lr,device\n");
    for e in epochs {
        let device = e.device.replace('"', "'");
        let lr = e.lr.map_or(String::new(), |lr| format!("{lr:e}"));
        let _ = writeln!(
            out,
            "{},{:.6},{:.6},{},{},{:.3},{lr},\"{}\"",
            e.epoch,
            e.train_loss,
            e.train_accuracy,
            opt(e.val_loss),
            opt(e.val_accuracy),
            e.seconds,
            device
        );
    }
    out
}

/// One curve: (legend label, colour, (epoch, value) points).
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// One panel of the plot: a title, y label, and its curves.
struct Panel<'a> {
    title: &'a str,
    y_label: &'a str,
    /// Legend in the top-right corner (curves that fall), else the bottom-right (curves that rise).
    legend_top: bool,
    series: Vec<Series<'a>>,
}

const W: f64 = 460.0;
const H: f64 = 340.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 52.0;

/// A "nice" tick step for a range (1, 2 or 5 times a power of ten).
fn tick_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn draw_panel(svg: &mut String, x0: f64, p: &Panel, epochs: usize) {
    let ys: Vec<f64> = p
        .series
        .iter()
        .flat_map(|s| s.2.iter().map(|q| q.1))
        .filter(|y| y.is_finite())
        .collect();
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let pad = 0.06 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let (px0, px1, py0, py1) = (x0 + LEFT, x0 + W - RIGHT, TOP, H - BOTTOM);
    let x_max = epochs.max(2) as f64;
    let sx = |e: f64| px0 + (e - 1.0) / (x_max - 1.0) * (px1 - px0);
    let sy = |y: f64| py1 - (y - lo) / (hi - lo) * (py1 - py0);
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="22" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"##,
        (px0 + px1) / 2.0,
        p.title
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{px0:.1}" y="{py0:.1}" width="{:.1}" height="{:.1}" fill="white" stroke="#444"/>"##,
        px1 - px0,
        py1 - py0
    );
    let step = tick_step(hi - lo, 5.0);
    let mut t = (lo / step).ceil() * step;
    while t <= hi {
        let y = sy(t);
        let label = if step >= 1.0 {
            format!("{t:.0}")
        } else {
            format!("{t:.*}", (-step.log10().floor()) as usize)
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{px0:.1}" y1="{y:.1}" x2="{px1:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{label}</text>"##,
            px0 - 6.0,
            y + 4.0
        );
        t += step;
    }
    let xstep = tick_step(x_max - 1.0, 8.0).max(1.0);
    let mut e = 1.0;
    while e <= x_max + 1e-9 {
        let x = sx(e);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{py1:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{e:.0}</text>"##,
            py1 + 5.0,
            py1 + 18.0
        );
        e += xstep;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">epoch</text>"##,
        (px0 + px1) / 2.0,
        H - 14.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
        x0 + 16.0,
        (py0 + py1) / 2.0,
        x0 + 16.0,
        (py0 + py1) / 2.0,
        p.y_label
    );
    let area = PlotArea {
        x: &sx,
        y: &sy,
        right: px1,
        top: py0,
        bottom: py1,
    };
    draw_series(svg, p, &area);
}

/// A panel's plot area: `x` and `y` map an epoch and a value into it; its right, top and bottom
/// edges.
struct PlotArea<'a> {
    x: &'a dyn Fn(f64) -> f64,
    y: &'a dyn Fn(f64) -> f64,
    right: f64,
    top: f64,
    bottom: f64,
}

/// Each series of `p` as a line with dots and its legend entry, in `area`.
fn draw_series(svg: &mut String, p: &Panel, area: &PlotArea) {
    let PlotArea {
        x: sx,
        y: sy,
        right: px1,
        top: py0,
        bottom: py1,
    } = *area;
    for (i, (label, colour, points)) in p.series.iter().enumerate() {
        let pts: Vec<String> = points
            .iter()
            .filter(|q| q.1.is_finite())
            .map(|&(e, y)| format!("{:.1},{:.1}", sx(e), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
            pts.join(" ")
        );
        for pt in &pts {
            let (x, y) = pt.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(svg, r##"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"##);
        }
        let ly = if p.legend_top {
            py0 + 14.0 + 16.0 * i as f64
        } else {
            py1 - 14.0 - 16.0 * (p.series.len() - 1 - i) as f64
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="11">{label}</text>"##,
            px1 - 110.0,
            px1 - 90.0,
            px1 - 85.0,
            ly + 4.0
        );
    }
}

/// Loss (left) and accuracy in % (right) per epoch, training and (when present) validation.
pub fn learning_curve_svg(epochs: &[EpochRecord]) -> String {
    let pts = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        epochs
            .iter()
            .filter_map(|e| f(e).map(|y| (e.epoch as f64, y)))
            .collect()
    };
    let (blue, orange) = ("#1f77b4", "#ff7f0e");
    let mut loss = Panel {
        title: "Loss",
        y_label: "cross-entropy",
        legend_top: true,
        series: vec![("training", blue, pts(&|e| Some(e.train_loss)))],
    };
    let mut acc = Panel {
        title: "Accuracy",
        y_label: "accuracy (%)",
        legend_top: false,
        series: vec![("training", blue, pts(&|e| Some(100.0 * e.train_accuracy)))],
    };
    if epochs.iter().any(|e| e.val_loss.is_some()) {
        loss.series.push(("validation", orange, pts(&|e| e.val_loss)));
        acc.series
            .push(("validation", orange, pts(&|e| e.val_accuracy.map(|a| 100.0 * a))));
    }
    // A third panel when the rate changes from epoch to epoch (a schedule).
    let rates = pts(&|e| e.lr);
    let scheduled = rates.windows(2).any(|w| w[0].1 != w[1].1);
    let rate = Panel {
        title: "Learning rate",
        y_label: "rate at the epoch's last step",
        legend_top: true,
        series: vec![("learning rate", "#2ca02c", rates)],
    };
    let panels = if scheduled { 3.0 } else { 2.0 };
    let n = epochs.iter().map(|e| e.epoch).max().unwrap_or(1);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{H:.0}" viewBox="0 0 {:.0} {H:.0}" font-family="sans-serif">"##,
        panels * W,
        panels * W
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="#fafafa"/>"##);
    draw_panel(&mut svg, 0.0, &loss, n);
    draw_panel(&mut svg, W, &acc, n);
    if scheduled {
        draw_panel(&mut svg, 2.0 * W, &rate, n);
    }
    svg.push_str("</svg>\n");
    svg
}

/// The current UTC time as YYYYmmdd-HHMMSS: the digits of humantime's RFC 3339 form
/// (`2026-11-30T22:48:13Z`). A clock set before 1970 counts as 1970 (humantime refuses earlier
/// times), and one past year 9999, which RFC 3339 can not write, gives `00000000-000000`.
pub fn utc_stamp() -> String {
    use std::fmt::Write;
    let now = std::time::SystemTime::now().max(std::time::UNIX_EPOCH);
    let mut rfc3339 = String::new();
    if write!(rfc3339, "{}", humantime::format_rfc3339_seconds(now)).is_err() {
        return "00000000-000000".to_string();
    }
    let digits: String = rfc3339.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!("{date}-{time}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_svg_hold_every_epoch() {
        let epochs: Vec<EpochRecord> = (1..=3)
            .map(|e| EpochRecord {
                epoch: e,
                train_loss: 1.0 / e as f64,
                train_accuracy: 0.9 + 0.01 * e as f64,
                val_loss: Some(1.1 / e as f64),
                val_accuracy: Some(0.89),
                seconds: 1.5,
                lr: Some(0.01 / e as f64),
                device: "cpu".to_string(),
            })
            .collect();
        let csv = metrics_csv(&epochs);
        assert_eq!(csv.lines().count(), 4);
        assert!(csv
            .lines()
            .nth(2)
            .is_some_and(|l| l.starts_with("2,0.500000,0.920000,0.550000,0.890000,1.500,")));
        let svg = learning_curve_svg(&epochs);
        assert_eq!(svg.matches("<polyline").count(), 5);
        assert!(csv.lines().nth(2).is_some_and(|l| l.contains(",5e-3,")), "{csv}");
        for label in [
            "epoch",
            "accuracy (%)",
            "cross-entropy",
            "validation",
            "training",
            "learning rate",
        ] {
            assert!(svg.contains(label), "{label}");
        }
        assert_eq!(utc_stamp().len(), 15);
    }
}
