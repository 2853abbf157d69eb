//! The `obelisk` command-line toolkit: I/O, pipelines and pictures on top of the
//! `segmentation` and `registration` crates.

pub mod pictures;
