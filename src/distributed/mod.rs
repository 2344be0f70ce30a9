//! Stage two on several processes: c10d process groups (`group`, bound through
//! `shim.cpp`), who is who from the launcher's environment (`launch`), gradients summed
//! in flat buckets (`buckets`) and AdamW state split across the ranks (`zero`).
pub mod buckets;
pub mod group;
pub mod launch;
pub mod zero;

pub use group::{Backend, GroupOptions, ProcessGroup};
pub use launch::WorldInfo;
