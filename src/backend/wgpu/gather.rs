//! Host side of gather.wgsl: the batch of a step from the u8 dataset on the device.
//!
//! Contract: `gather` checks the rows against the dataset and the tensor's length, then records
//! one dispatch of one invocation per word (4 pixels) of the batch.

use super::params::{GatherParams, KernelParams};
use super::pipelines::{grid_1d, Kernel};
use super::{Bound, WgpuBackend};
use crate::backend::ops::Gather;
use crate::data::IMAGE_PIXELS;
use crate::error::Result;

impl WgpuBackend {
    /// x (rows, 784) = images[order[start..start + rows]] / 255.
    pub(super) fn gather(&mut self, g: &Gather, start: usize) -> Result<()> {
        let op = "gather";
        self.dataset(op, g.ds, start, g.rows)?;
        self.tensor(op, g.x, g.rows * IMAGE_PIXELS)?;
        let words = IMAGE_PIXELS / 4;
        let params = GatherParams {
            start: Self::u32_of(op, "start", start)?,
            rows: Self::u32_of(op, "rows", g.rows)?,
            words_per_image: words as u32,
            _pad: 0,
        };
        let grid = grid_1d(g.rows * words, self.max_groups());
        let bind = [
            (1, Bound::Images(g.ds)),
            (2, Bound::Order(g.ds)),
            (3, Bound::Tensor(g.x)),
        ];
        self.record(Kernel::Gather, params.words(), &bind, grid)
    }
}
