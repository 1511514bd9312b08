//! `ArtifactStore` against real backends: a local directory in a temp dir, and `memory://`.

mod common;
mod imports;
mod reads;
mod urls;
mod writes;
