//! Stage two: training the student against the shards. This module grows with the
//! training loop; so far it holds the row stream, the optimiser and the schedule.
pub mod data;
pub mod eval;
pub mod hidden;
pub mod optim;
pub mod schedule;
pub mod trainer;
