//! One file per subcommand: argument parsing and output; the work lives in the library.
pub mod bench_reader;
pub mod env;
pub mod merge;
pub mod precompute;
pub mod score;
pub mod train;
