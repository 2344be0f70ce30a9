//! Stage two: training the student against the shards. This module grows with the
//! training loop; so far it holds the optimiser and the learning-rate schedule.
pub mod optim;
pub mod schedule;
