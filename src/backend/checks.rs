//! Argument checks shared by every backend, so that each op refuses bad arguments in the same
//! words whatever device runs it (each backend adds the checks of its own tensors).

use crate::data::CLASSES;
use crate::error::{Error, Result};

/// Rows start..start+rows must lie inside a dataset of `len` examples.
pub fn rows(op: &'static str, start: usize, rows: usize, len: usize) -> Result<()> {
    match start.checked_add(rows) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::shape(
            op,
            format!("rows {start}..{} past the dataset's {len}", start.saturating_add(rows)),
        )),
    }
}

/// `order` must be a visiting order of `len` examples (every index below `len`).
pub fn order(order: &[u32], len: usize) -> Result<()> {
    if order.len() != len || order.iter().any(|&i| i as usize >= len) {
        return Err(Error::shape(
            "set_order",
            "the order is not a permutation of the dataset".to_string(),
        ));
    }
    Ok(())
}

/// The loss op's class count and statistics slot.
pub fn loss(op: &'static str, classes: usize, slot: usize, reserved: usize) -> Result<()> {
    if classes != CLASSES {
        return Err(Error::shape(
            op,
            format!("{classes} classes, the labels are digits 0-9"),
        ));
    }
    if slot >= reserved {
        return Err(Error::shape(
            op,
            format!("stats slot {slot} not reserved ({reserved} are)"),
        ));
    }
    Ok(())
}

/// A read of `slots` statistics when `reserved` exist.
pub fn stats_read(first: usize, count: usize, reserved: usize) -> Result<()> {
    if first.checked_add(count).is_none_or(|end| end > reserved) {
        let end = first.saturating_add(count);
        return Err(Error::shape(
            "request_stats",
            format!("statistics slots {first}..{end} asked, {reserved} reserved"),
        ));
    }
    Ok(())
}
