//! Teacher-target shards: the row type (`row`), its Arrow schema and column names
//! (`schema`), the Parquet writer, the manifest, the life of a shard directory on the
//! writing side (`dir`: create, resume, overwrite, temporaries), the reader, merging
//! sliced runs, mixing several teachers' sets (`mixture`, `teachers`), and what
//! `inspect` reports, and the audit of what the stored targets lose (`audit`). The formats are documented in schemas/ (shards.md,
//! shard.schema.json).
pub mod audit;
pub mod dir;
pub mod inspect;
pub mod manifest;
pub mod merge;
pub mod mixture;
pub mod reader;
pub mod row;
pub mod schema;
pub mod teachers;
pub mod writer;

#[cfg(test)]
mod tests;
