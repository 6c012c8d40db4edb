//! Learning-rate schedules: the rate of every step of a run, computed on the host once, so that
//! the reference, the CPU path and a GPU that reads them from a table all use the same f32 for the
//! same step, and a resumed run continues the same sequence.
//!
//! Contract: `Schedule::rate(base, step)` is the formula of the schedule named, evaluated in f64
//! and rounded once to f32, for `step` counted from 0 over the whole run (not per epoch). The
//! formulas follow PyTorch's schedulers stepped once per batch (`scheduler.step()` after each
//! `optimizer.step()`): step k uses the rate PyTorch's scheduler reports after k calls. Past the
//! last step of a one-cycle or cosine schedule the rate stays at its final value.

use std::f64::consts::PI;

/// How the rate changes from step to step; `base` (the `--lr`) is the rate it starts from, or for
/// one-cycle the peak.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `base` at every step.
    Constant,
    /// PyTorch's StepLR per batch: base * gamma^floor(step / every).
    Step { every: usize, gamma: f64 },
    /// PyTorch's ExponentialLR per batch: base * gamma^step.
    Exponential { gamma: f64 },
    /// Hugging Face's cosine schedule with linear warm-up (`get_cosine_schedule_with_warmup`),
    /// with a floor: base * step / warmup for the first `warmup` steps (0 at step 0), then a
    /// cosine from base at step `warmup` down to `base * floor` at step `total` (and after).
    WarmupCosine { warmup: usize, total: usize, floor: f64 },
    /// PyTorch's OneCycleLR (two phases, cosine annealing, no momentum cycling): from
    /// base / div_factor up to base over the first pct_start of `total` steps, then down to
    /// base / div_factor / final_div_factor at step total - 1.
    OneCycle {
        total: usize,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
    },
}

impl Schedule {
    /// PyTorch's OneCycleLR with its defaults (pct_start 0.3, div_factor 25, final_div_factor
    /// 1e4) over `total` steps.
    pub fn one_cycle(total: usize) -> Schedule {
        Schedule::OneCycle {
            total,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        }
    }

    /// The rate of step `step` (from 0) for base rate `base`.
    pub fn rate(&self, base: f32, step: usize) -> f32 {
        self.rate_f64(base as f64, step) as f32
    }

    /// `rate` before its rounding to f32.
    pub fn rate_f64(&self, base: f64, step: usize) -> f64 {
        let k = step as f64;
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((step / every.max(1)) as i32),
            Schedule::Exponential { gamma } => base * gamma.powf(k),
            Schedule::WarmupCosine { warmup, total, floor } => {
                if step < warmup {
                    return base * k / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let pct = ((k - warmup as f64) / span).min(1.0);
                cosine(base, base * floor, pct)
            }
            Schedule::OneCycle {
                total,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = base / div_factor;
                let last = initial / final_div_factor;
                // PyTorch's phase ends: the peak at step pct_start * total - 1 (a fraction is kept),
                // the end at step total - 1.
                let peak = pct_start * total as f64 - 1.0;
                let end = total as f64 - 1.0;
                let k = k.min(end);
                // (A peak at step 0 or before it, from fewer than 1 / pct_start steps, has no
                // rising phase.)
                if k <= peak && peak > 0.0 {
                    cosine(initial, base, k / peak)
                } else {
                    cosine(base, last, (k - peak) / (end - peak))
                }
            }
        }
    }

    /// The schedule in the words `parse` reads, every parameter given: "constant",
    /// "step:every=500,gamma=0.1", "exponential:gamma=0.999", "cosine:warmup=100,total=2345,
    /// floor=0", "one-cycle:total=235,pct_start=0.3,div_factor=25,final_div_factor=10000".
    pub fn describe(&self) -> String {
        match *self {
            Schedule::Constant => "constant".to_string(),
            Schedule::Step { every, gamma } => format!("step:every={every},gamma={gamma}"),
            Schedule::Exponential { gamma } => format!("exponential:gamma={gamma}"),
            Schedule::WarmupCosine { warmup, total, floor } => {
                format!("cosine:warmup={warmup},total={total},floor={floor}")
            }
            Schedule::OneCycle {
                total,
                pct_start,
                div_factor,
                final_div_factor,
            } => format!(
                "one-cycle:total={total},pct_start={pct_start},div_factor={div_factor},final_div_factor={final_div_factor}"
            ),
        }
    }

    /// A schedule as `describe` writes it or as a user gives it (`--schedule`): a name, then
    /// optionally `:` and `key=value` pairs separated by commas. What is left out takes its
    /// default for a run of `total` steps: `total` itself; step decay every third of the run
    /// by gamma 0.1 (PyTorch's StepLR default); exponential decay to 1 % of the rate over the
    /// run; cosine without warm-up down to 0; one-cycle with PyTorch's defaults.
    pub fn parse(text: &str, total: usize) -> std::result::Result<Schedule, String> {
        let (name, rest) = text.trim().split_once(':').unwrap_or((text.trim(), ""));
        let mut pairs: Vec<(String, f64)> = Vec::new();
        for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let value: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{key} = {value:?} is not a number of 0 or more"))?;
            pairs.push((key.trim().to_string(), value));
        }
        let known: &[&str] = match name {
            "constant" => &[],
            "step" => &["every", "gamma"],
            "exponential" => &["gamma"],
            "cosine" => &["warmup", "total", "floor"],
            "one-cycle" => &["total", "pct_start", "div_factor", "final_div_factor"],
            _ => {
                return Err(format!(
                    "{name:?} is not one of constant, step, exponential, cosine, one-cycle"
                ))
            }
        };
        if let Some((key, _)) = pairs.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(format!("{name} takes {}, not {key:?}", words(known)));
        }
        let get = |key: &str, default: f64| pairs.iter().find(|(k, _)| k == key).map_or(default, |p| p.1);
        let count = |key: &str, default: usize| -> std::result::Result<usize, String> {
            let v = get(key, default as f64);
            match v.fract() == 0.0 && v <= u32::MAX as f64 {
                true => Ok(v as usize),
                false => Err(format!("{key} = {v} is not a whole number of steps")),
            }
        };
        let total = count("total", total)?.max(1);
        let schedule = match name {
            "constant" => Schedule::Constant,
            "step" => Schedule::Step {
                every: count("every", total.div_ceil(3))?.max(1),
                gamma: get("gamma", 0.1),
            },
            "exponential" => Schedule::Exponential {
                gamma: get("gamma", 0.01f64.powf(1.0 / total as f64)),
            },
            "cosine" => Schedule::WarmupCosine {
                warmup: count("warmup", 0)?,
                total,
                floor: get("floor", 0.0),
            },
            _ => Schedule::OneCycle {
                total,
                pct_start: get("pct_start", 0.3),
                div_factor: get("div_factor", 25.0),
                final_div_factor: get("final_div_factor", 1e4),
            },
        };
        schedule.check()?;
        Ok(schedule)
    }

    /// Refuse parameters that give no usable rate.
    fn check(&self) -> std::result::Result<(), String> {
        match *self {
            Schedule::Step { gamma, .. } | Schedule::Exponential { gamma } if !(gamma > 0.0 && gamma <= 1.0) => {
                Err(format!("gamma = {gamma} must be above 0 and at most 1"))
            }
            Schedule::WarmupCosine { floor, .. } if floor > 1.0 => Err(format!("floor = {floor} must be at most 1")),
            Schedule::OneCycle {
                pct_start,
                div_factor,
                final_div_factor,
                ..
            } if !(pct_start > 0.0 && pct_start < 1.0) || div_factor < 1.0 || final_div_factor < 1.0 => Err(
                "one-cycle needs pct_start above 0 and below 1, and div_factor and final_div_factor of 1 or more"
                    .to_string(),
            ),
            _ => Ok(()),
        }
    }

    /// The rates of steps 0..steps.
    pub fn rates(&self, base: f32, steps: usize) -> Vec<f32> {
        (0..steps).map(|step| self.rate(base, step)).collect()
    }
}

fn words(keys: &[&str]) -> String {
    match keys {
        [] => "no parameters".to_string(),
        _ => keys.join(", "),
    }
}

/// PyTorch's cosine annealing from `start` (pct 0) to `end` (pct 1).
fn cosine(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Step by step against the formulas written out independently.
    #[test]
    fn every_schedule_follows_its_formula_over_a_whole_run() {
        let base = 0.01f32;
        let b = base as f64;
        let close = |what: &str, got: f32, want: f64| {
            assert!(
                (got as f64 - want).abs() <= 1e-7 * want.abs(),
                "{what}: {got} against {want}"
            );
        };
        for step in 0..300 {
            close("constant", Schedule::Constant.rate(base, step), b);
            let s = Schedule::Step { every: 30, gamma: 0.5 };
            close("step", s.rate(base, step), b * 0.5f64.powi((step / 30) as i32));
            let e = Schedule::Exponential { gamma: 0.99 };
            close("exponential", e.rate(base, step), b * 0.99f64.powi(step as i32));
        }
        // Warm-up: linear to the base at step `warmup`, then down to the floor at `total`.
        let w = Schedule::WarmupCosine {
            warmup: 10,
            total: 110,
            floor: 0.1,
        };
        close("warm-up, first step", w.rate(base, 0), 0.0);
        close("warm-up, second step", w.rate(base, 1), b / 10.0);
        close("warm-up, peak", w.rate(base, 10), b);
        close("cosine, half way", w.rate(base, 60), b * 0.1 + (b - b * 0.1) / 2.0);
        close("cosine, last", w.rate(base, 110), b * 0.1);
        close("cosine, after the last", w.rate(base, 500), b * 0.1);
        assert!(w.rates(base, 111).windows(2).take(10).all(|p| p[0] < p[1]));
        assert!(w.rates(base, 111)[10..].windows(2).all(|p| p[0] >= p[1]));
    }

    #[test]
    fn a_schedule_reads_back_what_describe_writes() {
        for text in [
            "constant",
            "step",
            "exponential",
            "cosine:warmup=10",
            "one-cycle",
            "step:every=7,gamma=0.5",
        ] {
            let s = Schedule::parse(text, 235).unwrap();
            assert_eq!(Schedule::parse(&s.describe(), 1).unwrap(), s, "{text}");
        }
        assert_eq!(Schedule::parse("one-cycle", 235).unwrap(), Schedule::one_cycle(235));
        let e = Schedule::parse("exponential", 100).unwrap();
        assert!((e.rate_f64(1.0, 100) - 0.01).abs() < 1e-12);
        for bad in [
            "linear",
            "step:gamma",
            "step:gamma=2",
            "cosine:warmup=1.5",
            "one-cycle:pct_start=1",
            "constant:x=1",
        ] {
            assert!(Schedule::parse(bad, 10).is_err(), "{bad}");
        }
    }

    /// PyTorch's OneCycleLR as the fastest MNIST recipe sets it (total 235, max 0.01): the first
    /// rate is max / 25, the peak falls between steps 69 and 70 (phase end 0.3 * 235 - 1 = 69.5),
    /// the last is max / 25 / 1e4, and the rates rise then fall.
    #[test]
    fn one_cycle_has_pytorchs_boundaries() {
        let (base, total) = (0.01f32, 235);
        let s = Schedule::one_cycle(total);
        let rates = s.rates(base, total);
        let b = base as f64;
        assert!((rates[0] as f64 - b / 25.0).abs() < 1e-10);
        assert!((rates[total - 1] as f64 - b / 25.0 / 1e4).abs() < 1e-12);
        let peak = 69.5;
        // The step after the peak phase's end: pct (70 - 69.5) / (234 - 69.5) of the way down.
        let after = b / 25.0 / 1e4 + (b - b / 25.0 / 1e4) / 2.0 * ((PI * 0.5 / (234.0 - peak)).cos() + 1.0);
        assert!((s.rate_f64(b, 70) - after).abs() < 1e-15);
        // Step 69, 69 / 69.5 of the way up.
        let before = b + (b / 25.0 - b) / 2.0 * ((PI * 69.0 / peak).cos() + 1.0);
        assert!((s.rate_f64(b, 69) - before).abs() < 1e-15);
        let top = rates.iter().cloned().fold(0.0f32, f32::max);
        assert!(top < base && top > 0.999 * base, "peak {top}");
        assert!(rates[..70].windows(2).all(|p| p[0] < p[1]));
        assert!(rates[70..].windows(2).all(|p| p[0] > p[1]));
        assert_eq!(s.rate(base, 10_000), rates[total - 1]);
        // Runs too short for a rising phase are finite throughout.
        for total in 1..8 {
            let rates = Schedule::one_cycle(total).rates(base, total + 2);
            assert!(rates.iter().all(|r| r.is_finite() && *r > 0.0), "{total}: {rates:?}");
        }
    }
}
