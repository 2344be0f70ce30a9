//! Teacher-target shards: the Arrow schema, the Parquet writer and the manifest.
//! The formats are documented in schemas/ (shards.md, shard.schema.json).
pub mod inspect;
pub mod manifest;
pub mod merge;
pub mod reader;
pub mod schema;
pub mod writer;
