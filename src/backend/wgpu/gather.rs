//! Host side of gather.wgsl: the batch of a step from the u8 dataset on the device.
//!
//! Contract: `gather` checks the rows against the dataset and the tensor's length, then records
//! one dispatch of one invocation per word (4 pixels) of the batch, or, augmented, one per pixel,
//! reading its step from dropout's step base (`dropout::select_step_base`).

use super::params::{GatherParams, KernelParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::{Gather, StepAt};
use crate::data::IMAGE_PIXELS;
use crate::error::Result;

impl WgpuBackend {
    /// x (rows, 784) = images[order[start..start + rows]] / 255, or with `g.augment` each image
    /// under its transform of step `at.step` (one invocation per pixel).
    pub(super) fn gather(&mut self, g: &Gather, at: StepAt) -> Result<()> {
        let op = "gather";
        let start = at.start;
        self.dataset(op, g.ds, start, g.rows)?;
        self.tensor(op, g.x, g.rows * IMAGE_PIXELS)?;
        let words = IMAGE_PIXELS / 4;
        let mut params = GatherParams {
            start: Self::u32_of(op, "start", start)?,
            rows: Self::u32_of(op, "rows", g.rows)?,
            words_per_image: words as u32,
            ..GatherParams::default()
        };
        let mut bind = vec![
            (1, Bound::Images(g.ds)),
            (2, Bound::Order(g.ds)),
            (3, Bound::Tensor(g.x)),
        ];
        let Some(aug) = g.augment else {
            let grid = grid_1d(g.rows * words, self.max_groups());
            return self.record(Kernel::Gather, params.words(), &bind, grid);
        };
        self.select_step_base(at)?;
        params.slot = Self::u32_of(op, "the statistics slot", at.slot)?;
        (params.key, params.shift, params.rotate, params.scale) = (aug.key, aug.shift, aug.rotate, aug.scale);
        bind.push((4, Bound::StepBase));
        let grid = grid_1d(g.rows * IMAGE_PIXELS, self.max_groups());
        self.record(Kernel::GatherAugmented, params.words(), &bind, grid)
    }
}
