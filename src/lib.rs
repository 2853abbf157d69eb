//! The `obelisk` application crate: file formats, pipelines, pictures and the command-line
//! front end, shared by the binary, the integration tests and examples.

pub mod cli;
pub mod io;
pub mod memory;
pub mod pictures;
pub mod pipeline;
pub mod progress;
